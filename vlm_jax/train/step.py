"""Train state, loss and the jitted train step with shardings from the logical rules."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.model import forward
from vlm_jax.train.param_groups import ParamGroups, merge_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any

    @property
    def params(self):
        return merge_params(self.trainable, self.frozen)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Mean next-token loss over masked positions, and the number of those positions."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    mask = mask.astype(jnp.float32)
    count = mask.sum()
    return (nll * mask).sum() / jnp.maximum(count, 1.0), count


def init_state(optimizer: optax.GradientTransformation, groups: ParamGroups, params) -> TrainState:
    trainable, frozen = groups.split(params)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings, rules=parallel.LOGICAL_RULES, seed: int = 0) -> Callable:
    """Returns jitted `step(state, batch) -> (state, metrics)` that runs unchanged on any mesh.

    Each step passes a 'dropout' rng derived from (seed, step), so LoRA dropout is on in training only and a
    resumed run draws the same masks."""

    def loss_fn(trainable, frozen, batch, dropout_key):
        logits = forward(model, {"params": merge_params(trainable, frozen)}, batch, rngs={"dropout": dropout_key})
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

    def step(state: TrainState, batch: dict):
        with nn.logical_axis_rules(rules):
            (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.trainable, state.frozen, batch, jax.random.fold_in(jax.random.key(seed), state.step))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "loss_tokens": count, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                     out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    return run
