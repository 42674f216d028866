"""The optimizer over the trainable parameter groups (vlm_jax/train/param_groups.py): one schedule, weight
decay and update rule per group through optax.multi_transform, global-norm clipping across all groups,
and per-layer masks for partially unfrozen scanned stacks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from vlm_jax.train.param_groups import GroupSpec, ParamGroups, Path

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
# Weight decay by leaf name, not ndim: scanned layers give biases and norm scales a leading layer axis.
DECAYED_LEAVES = ("kernel", "embedding", "lora_a", "lora_b")


def learning_rate_schedule(s: GroupSpec, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `s.lr` (s.warmup_steps, or s.warmup_fraction of total_steps and at least 1), then
    cosine or linear decay to `s.lr * s.final_lr_ratio` at total_steps, or constant."""
    steps = max(1, round(s.warmup_fraction * total_steps)) if s.warmup_fraction else int(s.warmup_steps)
    warmup = min(steps, max(total_steps - 1, 0))
    if s.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=s.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=s.lr * s.final_lr_ratio)
    if s.schedule == "linear":
        after = optax.linear_schedule(s.lr, s.lr * s.final_lr_ratio, max(total_steps - warmup, 1))
    elif s.schedule == "constant":
        after = optax.constant_schedule(s.lr)
    else:
        raise ValueError(f"unknown schedule {s.schedule!r}; choose from {SCHEDULES}")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, s.lr, warmup), after], [warmup])


def _decay_mask(tree):
    # tree_map (not flatten_dict): inside multi_transform other groups' leaves are empty MaskedNodes.
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED_LEAVES, tree)


def _group_transform(o: ml_collections.ConfigDict, s: GroupSpec, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(s, total_steps)
    if o.optimizer == "adamw":
        return optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=s.weight_decay, mask=_decay_mask)
    if o.optimizer == "sgd":  # plain SGD: update = -lr * (grad + wd * param)
        return optax.chain(optax.add_decayed_weights(s.weight_decay, _decay_mask), optax.scale_by_learning_rate(lr))
    raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; choose from {OPTIMIZERS}")


def mask_layers(masks: dict[Path, np.ndarray], fill: float) -> optax.GradientTransformation:
    """Sets the frozen layers of partially unfrozen stacks to `fill` (stateless).

    Applied to gradients (fill 0: frozen layers add nothing to the clipping norm or to Adam's moments) and to
    the final updates with fill -0.0: `p + (-0.0) == p` bit for bit for every p, including p = -0.0, which
    `p + 0.0` would turn into +0.0, so masked layers stay bit-identical through optax.apply_updates.
    """
    def update(updates, state, params=None):
        del params
        flat = traverse_util.flatten_dict(updates)
        for path, mask in masks.items():
            u = flat[path]
            keep = jnp.asarray(mask).reshape((-1,) + (1,) * (u.ndim - 1))
            flat[path] = jnp.where(keep, u, jnp.asarray(fill, u.dtype))
        return traverse_util.unflatten_dict(flat), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(o: ml_collections.ConfigDict, groups: ParamGroups, total_steps: int) -> optax.GradientTransformation:
    """Optimizer over the trainable tree of `groups.split(params)`: frozen groups are not in that tree, so
    they carry no optimizer state."""
    # A label tree, not a callable: optax.tree_map_params initialises with a placeholder in place of params.
    labels = traverse_util.unflatten_dict(groups.trainable_labels)
    transforms = {g: _group_transform(o, s, total_steps) for g, s in groups.specs.items() if not s.frozen}
    masks = groups.layer_masks

    return optax.chain(
        mask_layers(masks, 0.0) if masks else optax.identity(),
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
        optax.multi_transform(transforms, labels),
        mask_layers(masks, -0.0) if masks else optax.identity())


def optimizer_state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state)
               if hasattr(x, "shape"))
