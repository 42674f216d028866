"""Connectors from vision tokens to the LLM width. Implemented: `mlp` (LLaVA mlp2x_gelu, XVERSE-V llama_proj)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import DTypeLike

from vlm_jax.layers.lora import LoraSpec
from vlm_jax.layers.mlp import MLP
from vlm_jax.layers.norms import LayerNorm


class MLPProjector(nn.Module):
    """[LayerNorm (XVERSE-V ln_vision)] -> Linear(d_vis, out) -> exact GELU -> Linear(out, out)."""

    config: ml_collections.ConfigDict  # model.connector
    out_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.config.in_norm:
            x = LayerNorm(self.config.norm_eps, name="in_norm", **kw)(x)
        return MLP(self.out_dim, "gelu", out_dim=self.out_dim, name="mlp", lora=self.lora, **kw)(x)


CONNECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector}
