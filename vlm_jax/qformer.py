"""BLIP-2 Q-Former (query branch) + `language_projection`: connector kind `qformer` (Ziya-BLIP2-14B).

`num_queries` learned query vectors -> input LayerNorm -> `layers` post-LN BERT layers (self-attention over
the queries, cross-attention to the image features in every `cross_attention_frequency`-th layer starting
with the first, query FFN; each sub-block adds its residual, then LayerNorm) -> Linear to the LLM width.
Any depth and frequency HF builds: the `layers // cross_attention_frequency` whole units of
`cross_attention_frequency` layers scan (`layers`), the `layers % cross_attention_frequency` left over, which
start with a cross-attention layer, follow unscanned (`tail`).
Computes what HF `Blip2ForConditionalGeneration.get_image_features` computes for query-only input (no text
branch, dropout off). docs/architectures.md 3.3.

Config (`model.connector`): num_queries, width, layers, heads, mlp_dim, cross_attention_frequency, norm_eps.
Every image (tile) becomes exactly `num_queries` visual tokens, whatever its patch count.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers import axes
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.mlp import MLP
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.layers.scan import run_blocks
from vlm_jax.layers.self_attention import SelfAttention


class QFormerLayer(nn.Module):
    """One post-LN BERT layer of the query branch (HF `Blip2QFormerLayer` with only query tokens)."""

    heads: int
    mlp_dim: int
    norm_eps: float
    cross: bool
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array) -> jax.Array:
        kw, lora = self.options.dtypes, self.options.lora
        attn = functools.partial(SelfAttention, self.heads, self.heads, x.shape[-1] // self.heads, causal=False,
                                 qkv_bias=True, out_bias=True, lora=lora, **kw)
        x = LayerNorm(self.norm_eps, name="attn_norm", **kw)(x + attn(name="attn")(x))
        if self.cross:
            x = LayerNorm(self.norm_eps, name="cross_norm", **kw)(x + attn(name="cross_attn")(x, context=image))
        h = MLP(self.mlp_dim, "gelu", name="mlp", lora=lora, **kw)(x)
        return nn.with_logical_constraint(LayerNorm(self.norm_eps, name="mlp_norm", **kw)(x + h), axes.BLE)


class QFormerBlock(nn.Module):
    """`depth` consecutive layers, cross-attention in the first. HF layer i has it when
    i % cross_attention_frequency == 0, so every whole unit of `cross_attention_frequency` layers has the same
    parameters and the units scan; the remainder is one shorter unit."""

    depth: int
    layer: dict

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array) -> tuple[jax.Array, None]:
        for j in range(self.depth):
            x = QFormerLayer(**self.layer, cross=j == 0, name=f"layer_{j}")(x, image)
        return x, None


class QFormer(nn.Module):
    config: ml_collections.ConfigDict  # model.connector
    out_dim: int
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        """image features [N, P, d_vis] -> [N, num_queries, out_dim]."""
        c, o = self.config, self.options
        freq = c.cross_attention_frequency
        if freq < 1:
            raise ValueError(f"model.connector.cross_attention_frequency {freq}: must be at least 1")
        units, rest = divmod(c.layers, freq)
        # HF keeps the Q-Former and its queries in fp32 (`_keep_in_fp32_modules`) whatever the model dtype.
        fp32 = dataclasses.replace(o, dtype=jnp.float32)
        # BLIP-2 initialises the queries with N(0, 0.02) (LAVIS `init_Qformer`); imports replace them.
        queries = self.param("query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          (None, axes.EMBED)),
                             (c.num_queries, c.width), o.param_dtype)
        x = jnp.broadcast_to(jnp.asarray(queries, jnp.float32), (image.shape[0], c.num_queries, c.width))
        x = LayerNorm(c.norm_eps, name="in_norm", **fp32.dtypes)(x)
        layer = dict(heads=c.heads, mlp_dim=c.mlp_dim, norm_eps=c.norm_eps, options=fp32)
        image = image.astype(jnp.float32)
        x = run_blocks(QFormerBlock, dict(depth=freq, layer=layer), x, image, num_layers=units, scan=True,
                       remat_policy="none")
        if rest:
            x, _ = QFormerBlock(rest, layer, name="tail")(x, image)
        return Dense(self.out_dim, (axes.MLP, axes.EMBED), use_bias=True, lora=o.lora, name="projection",
                     **o.dtypes)(x.astype(o.dtype))
