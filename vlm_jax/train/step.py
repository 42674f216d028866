"""Train state and the jitted train step (loss: layers/loss.py) with shardings from the logical rules."""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.model import forward_loss
from vlm_jax.layers.loss import masked_sum
from vlm_jax.train.param_groups import ParamGroups, merge_params


@flax.struct.dataclass
class TrainState:
    """The parameters split as the step takes them (gradients of `trainable` only), and the optimizer state of
    those. The same dataclass holds the abstract state and the state's shardings."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any

    @property
    def params(self):
        return merge_params(self.trainable, self.frozen)

    def saved(self) -> dict:
        """What a checkpoint holds (vlm_jax/checkpoints/train_state.py): the parameters whole, so reading them
        back needs no freeze rules. The leaves are the state's own: nothing is copied or cast."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_saved(cls, saved: dict, groups: ParamGroups) -> "TrainState":
        trainable, frozen = groups.split(saved["params"])
        return cls(step=saved["step"], trainable=trainable, frozen=frozen, opt_state=saved["opt_state"])


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value in `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.floating)] or [True]))


def split_micro_batches(batch: dict, n: int, mesh: Mesh) -> dict:
    """[B, ...] -> [n, B / n, ...]: micro-batch i holds rows i, i + n, ..., so each keeps its share of every
    device's rows (a contiguous split would put whole micro-batches on a few devices). A batch whose rows come in
    groups of g (arrays of one entry per group, [B / g, ...]: docs/contracts.md) splits by whole groups."""
    spec = parallel.batch_sharding(mesh).spec
    # Arrays of one entry per group have the fewest leading entries; every other array has one per row.
    rows = max(x.shape[0] for x in jax.tree.leaves(batch))
    group = rows // min(x.shape[0] for x in jax.tree.leaves(batch))

    def split(x):
        unit = group if x.shape[0] == rows else 1  # leading entries per group: g rows, or 1 of a per-group array
        x = jnp.swapaxes(x.reshape(x.shape[0] // (n * unit), n, unit, *x.shape[1:]), 0, 1)
        x = x.reshape(n, x.shape[1] * unit, *x.shape[3:])
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            None, *spec)))
    return jax.tree.map(split, batch)


def init_state(optimizer: optax.GradientTransformation, groups: ParamGroups, params,
               frozen_dtype: jnp.dtype | None = None) -> TrainState:
    """Step 0 of `params`; the frozen ones stored as `frozen_dtype` when given (they are only read, in the
    compute dtype: a bf16 copy of bf16-released weights loses nothing and halves their memory)."""
    trainable, frozen = groups.split(params)
    if frozen_dtype is not None:
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable))


def source_sums(nll: jax.Array, mask: jax.Array, source_ids: jax.Array, sources: int) -> jax.Array:
    """[2, sources]: each source's summed per-token loss over the masked positions of its examples
    (`source_ids`, the batch's), and the number of those positions (masked_sum of each source's tokens)."""
    return jnp.stack([jnp.stack(masked_sum(nll, jnp.where(source_ids == k, mask, 0.0))) for k in range(sources)],
                     axis=1)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings, rules=parallel.LOGICAL_RULES, seed: int = 0, micro_batches: int = 1,
                    sources: tuple[str, ...] = ()) -> Callable:
    """Returns jitted `step(state, batch) -> (state, metrics)` that runs unchanged on any mesh.

    Each step passes a 'dropout' rng derived from (seed, step), so LoRA dropout is on in training only and a
    resumed run draws the same masks. With `micro_batches` n > 1 the batch runs as n slices one after another
    (gradient accumulation), summing the loss and its gradients over all of them before the one optimizer
    update: the same token-weighted mean loss and gradients as one pass, with about 1/n of the activations live.

    A step whose loss, gradient norm or updated parameters are not all finite keeps the parameters and optimizer
    state it was given (metrics["skipped"] is 1): no non-finite value ever enters the state.

    With `sources`, the names of a mixture's two or more training sources (data/mixture.py mixture_names), the
    metrics also hold `loss/<name>`: the token-weighted mean loss of that source's loss-mask tokens in the step's
    batch (its `source_ids`), NaN when the batch has none of them; it takes no part in the gradients.

    Mixed precision: the trainable parameters enter the forward in the model's compute dtype, cast on each device's
    own shard, so FSDP gathers them and reduce-scatters their gradients in that dtype (bf16, as DeepSpeed and
    FSDP mixed precision do), and the fp32 master weights and the update stay fp32. The layers cast their weights
    to it anyway (LayerNorm now reads its scale and bias rounded to it); cast after the gather, the compiler keeps
    fp32 copies and gradients of whole layers (launch/plan.py shows the cost; docs/experiments.md 4)."""
    compute = jnp.dtype(model.config.dtype)

    def to_compute(x: jax.Array) -> jax.Array:
        return x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def value_and_grads(mean, trainable, frozen, batch, dropout_key):
        """(loss: the mean over the loss-mask tokens, or with `mean` False their sum; token count, gradients,
        per-source sums: source_sums, or () without `sources`)."""
        def value(trainable):
            params = merge_params(jax.tree.map(to_compute, trainable), frozen)
            mask = batch["loss_mask"]
            total, nll = forward_loss(model, {"params": params}, batch, mask, rngs={"dropout": dropout_key})
            count = mask.astype(jnp.float32).sum()
            per_source = source_sums(nll, mask, batch["source_ids"], len(sources)) if sources else ()
            return total / jnp.maximum(count, 1.0) if mean else total, (count, per_source)
        (total, (count, per_source)), grads = jax.value_and_grad(value, has_aux=True)(trainable)
        return total, count, grads, per_source

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        with nn.logical_axis_rules(rules):
            if micro_batches == 1:  # the mean differentiated directly, not the sum divided afterwards
                loss, count, grads, per_source = value_and_grads(True, state.trainable, state.frozen, batch, key)
            else:
                def accumulate(sums, xs):
                    i, micro = xs
                    return jax.tree.map(jnp.add, sums, value_and_grads(
                        False, state.trainable, state.frozen, micro, jax.random.fold_in(key, i))), None
                zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable),
                         jnp.zeros((2, len(sources))) if sources else ())
                (total, count, grads, per_source), _ = jax.lax.scan(
                    accumulate, zeros, (jnp.arange(micro_batches), split_micro_batches(batch, micro_batches, mesh)))
                denominator = jnp.maximum(count, 1.0)
                loss, grads = total / denominator, jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # A finite loss can still give an update that overflows, so the new parameters are checked as well.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        metrics = {"loss": loss, "loss_tokens": count, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}
        for name, (total_k, count_k) in zip(sources, per_source.T if sources else ()):
            metrics[f"loss/{name}"] = jnp.where(count_k > 0, total_k / jnp.maximum(count_k, 1.0), jnp.nan)
        # The step counter advances over a skipped update (its batch is consumed); the optimizer state, the
        # schedule's count in it included, does not.
        return state.replace(step=state.step + 1, trainable=keep(trainable, state.trainable),
                             opt_state=keep(opt_state, state.opt_state)), metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                     out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for lowering and compiled-memory checks
    return run
