"""Feed-forward blocks: SwiGLU (LLM decoders) and fc1-act-fc2 (ViTs, projectors)."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from vlm_jax.layers import axes
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.lora import LoraSpec


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    # PyTorch nn.GELU() is the erf form; flax's default is the tanh approximation.
    return nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"quick_gelu": quick_gelu, "gelu": gelu_exact}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (LLaMA / Qwen2)."""

    hidden_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        gate = dense(self.hidden_dim, (axes.EMBED, axes.MLP), name="gate_proj")(x)
        up = dense(self.hidden_dim, (axes.EMBED, axes.MLP), name="up_proj")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, axes.BLM)
        return dense(x.shape[-1], (axes.MLP, axes.EMBED), name="down_proj")(h)


class MLP(nn.Module):
    """fc2(act(fc1(x))) with biases; `out_dim` defaults to the input width."""

    hidden_dim: int
    act: str
    out_dim: int | None = None
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(Dense, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                                  lora=self.lora)
        h = dense(self.hidden_dim, (axes.EMBED, axes.MLP), name="fc1")(x)
        h = nn.with_logical_constraint(activation(self.act)(h), axes.BLM)
        return dense(self.out_dim or x.shape[-1], (axes.MLP, axes.EMBED), name="fc2")(h)
