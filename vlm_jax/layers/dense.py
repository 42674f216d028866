"""The one dense layer every projection goes through (so LoRA can hook in at a single place)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec


def _as_tuple(v: int | Sequence[int]) -> tuple[int, ...]:
    return (v,) if isinstance(v, int) else tuple(v)


class Dense(nn.Module):
    """DenseGeneral with logical axis names.

    `kernel_axes` names every kernel axis: first the contracted input axes (in the order of `axis`), then
    the output `features` axes. The kernel has shape `in_shape + features`, e.g. a q projection is
    `[embed, heads, head_dim]` and an output projection `[heads, head_dim, embed]`.

    With `lora` set and its targets matching this module's path, a LoRA adapter is added (layers/lora.py);
    its dropout runs only when the caller supplies a 'dropout' rng (training).
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _as_tuple(self.features)
        axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        if len(self.kernel_axes) != len(in_shape) + len(features):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {in_shape + features}")
        n_in = len(in_shape)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal",
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(features))))
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
            in_shape + features, self.param_dtype)
        y = jax.lax.dot_general(
            x.astype(self.dtype), jnp.asarray(kernel, self.dtype), ((axis, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.kernel_axes[n_in:])),
                features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        if self.lora is not None and self.lora.applies_to("/".join(self.path)):
            y = y + self._lora(x, axis, in_shape, features)
        return y

    def _lora(self, x: jax.Array, axis: tuple[int, ...], in_shape: tuple[int, ...],
              features: tuple[int, ...]) -> jax.Array:
        r, n_in = self.lora.rank, len(in_shape)
        # PEFT's init: A kaiming-uniform (bound 1/sqrt(fan_in)), B zeros.
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                                  out_axis=n_in)
        a = self.param(LORA_A, nn.with_logical_partitioning(a_init, (*self.kernel_axes[:n_in], None)),
                       in_shape + (r,), self.param_dtype)
        b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (None, *self.kernel_axes[n_in:])),
                       (r,) + features, self.param_dtype)
        if self.lora.dropout and self.has_rng("dropout"):
            x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
        h = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(a, self.dtype),
                                ((axis, tuple(range(n_in))), ((), ())))
        y = jax.lax.dot_general(h, jnp.asarray(b, self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return (self.lora.scale * y).astype(self.dtype)
