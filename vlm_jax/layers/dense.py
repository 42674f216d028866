"""The one dense layer every projection goes through (so LoRA can hook in at a single place)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def _as_tuple(v: int | Sequence[int]) -> tuple[int, ...]:
    return (v,) if isinstance(v, int) else tuple(v)


class Dense(nn.Module):
    """DenseGeneral with logical axis names.

    `kernel_axes` names every kernel axis: first the contracted input axes (in the order of `axis`), then
    the output `features` axes. The kernel has shape `in_shape + features`, e.g. a q projection is
    `[embed, heads, head_dim]` and an output projection `[heads, head_dim, embed]`.
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

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
        return y
