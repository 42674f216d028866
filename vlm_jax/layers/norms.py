"""RMSNorm and LayerNorm computed in fp32 (as the PyTorch references do) and cast back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from vlm_jax.layers import axes


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # HF LLaMA casts back to the input dtype before the weight multiply.
        return y.astype(self.dtype) * jnp.asarray(scale, self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)), features,
            self.param_dtype)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)), features,
            self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
