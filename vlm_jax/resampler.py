"""Qwen-VL's cross-attention resampler (`attn_pool`) + `ln_post` + `proj`: connector kind `resampler`
(Belle-VL; docs/architectures.md 4.2).

`num_queries` (a square grid) learned queries attend once to the image tokens: keys/values are
`ln_kv(kv_proj(x))`, queries `ln_q(query) + pos_embed`, and the keys also get `pos_embed` resized to the
image's patch grid; one multi-head attention (nn.MultiheadAttention, `width / 128` heads), `ln_post`, then
`x @ proj`. `pos_embed` is the fixed 2-D sin-cos table (MAE recipe: first half of the channels encodes the
column, second half the row), held as a parameter because the checkpoint stores it; stage recipes keep it
frozen. Width = the LLM width (`proj` is square).

Config (`model.connector`): num_queries, heads, norm_eps.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.layers import axes
from vlm_jax.layers.bicubic import resize_grid
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.layers.self_attention import SelfAttention


def sincos_2d(width: int, grid: int) -> np.ndarray:
    """[grid*grid, width] float32, row-major over (row, col): [sin, cos](col * w) then [sin, cos](row * w),
    w_k = 10000^(-k / (width / 4)) (Qwen-VL's get_2d_sincos_pos_embed)."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float32) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


class Resampler(nn.Module):
    config: ml_collections.ConfigDict  # model.connector
    out_dim: int
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        """image features [N, P, d_vis] (P a square grid) -> [N, num_queries, out_dim]."""
        c, e, o = self.config, self.out_dim, self.options
        grid, image_grid = math.isqrt(c.num_queries), math.isqrt(image.shape[1])
        if grid * grid != c.num_queries or image_grid * image_grid != image.shape[1]:
            raise ValueError(f"resampler: {c.num_queries} queries and {image.shape[1]} image tokens must be "
                             "square grids")
        kw, dtype, param_dtype = o.dtypes, o.dtype, o.param_dtype
        # Qwen-VL: trunc_normal(std=0.02) queries; the sin-cos table is computed, never learned.
        query = self.param("query", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
                           (c.num_queries, e), param_dtype)
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(sincos_2d(e, grid), param_dtype), (None, axes.EMBED)),
            (c.num_queries, e), param_dtype)
        kv = Dense(e, (axes.MLP, axes.EMBED), name="kv_proj", lora=o.lora, **kw)(image)
        kv = LayerNorm(c.norm_eps, name="ln_kv", **kw)(kv)
        q = LayerNorm(c.norm_eps, name="ln_q", **kw)(jnp.asarray(query)) + jnp.asarray(pos, dtype)
        q = jnp.broadcast_to(q, (image.shape[0], *q.shape))
        keys = kv + resize_grid(jnp.asarray(pos), grid, image_grid).astype(dtype)
        x = SelfAttention(c.heads, c.heads, e // c.heads, causal=False, qkv_bias=True, out_bias=True, name="attn",
                          lora=o.lora, **kw)(q, context=kv, key_context=keys)
        x = LayerNorm(c.norm_eps, name="ln_post", **kw)(x)
        return Dense(e, (axes.MLP, axes.EMBED), name="proj", lora=o.lora, **kw)(x)
