"""One pre-LN ViT with swappable stems. Implemented stems: `clip` (HF `CLIPVisionModel`), `eva` (BLIP-2's
EVA ViT-g, HF `Blip2VisionModel`: the clip stem with a patch-embedding bias; with the config knobs
`pre_norm=False`, `qkv_bias="qv"` (no key bias), `mlp_act="gelu"`, `post_norm=True`) and `qwenvl` (Qwen-VL's
ViT-bigG, Belle-VL: no class token, a `pos_grid` x `pos_grid` position table resized to the patch grid).

Input tiles [N, S, S, 3] (normalised, HWC) -> visual tokens [N, P, width], P = (S // patch)**2 (+1 with
the class token when `drop_cls` is off).

Output is HF's `hidden_states[feature_layer]`: hidden_states[0] is the stem output, hidden_states[i] the
output of block i-1; with `post_norm` it then goes through `post_layernorm` (all tokens, class token
included), which is BLIP-2's `last_hidden_state` at feature_layer=-1. Only the blocks that feed the chosen
layer are built (feature_layer=-2 of a depth-24 tower builds 23), so the unused last block has no
parameters; importers drop its weights.

The `navit` stem (Qwen2-VL's vision tower, as POINTS1.5 uses it) takes packed patches instead of tiles:
patches [B, N, C*T*p*p] of several images per row in the processor's order (vlm_jax/data/navit.py), their
(row, col) [B, N, 2] for the 2-D RoPE of every block, and segment ids [B, N] (1, 2, ... per image, 0 =
padding) so attention stays inside each image -> [B, N, width]. It has no class token, positions table or
final norm (POINTS takes the last block's output: feature_layer=-1).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import DTypeLike

from vlm_jax.layers import axes
from vlm_jax.layers.bicubic import resize_grid
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.mlp import MLP
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.layers.scan import run_blocks
from vlm_jax.layers.self_attention import SelfAttention


def patchify(tiles: jax.Array, patch_size: int) -> jax.Array:
    """[N, S, S, C] -> [N, (S/p)**2, C*p*p], patches row-major, each flattened in (C, kh, kw) order.

    That order makes a Dense kernel `W.reshape(O, C*kh*kw).T` of a PyTorch Conv2d weight [O, C, kh, kw]
    (stride = kernel) compute the same patch embedding.
    """
    n, s, _, c = tiles.shape
    g = s // patch_size
    x = tiles.reshape(n, g, patch_size, g, patch_size, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, g * g, c * patch_size * patch_size)


class ClipStem(nn.Module):
    """Patch embedding (bias-free in CLIP, with a bias in EVA), class token, learned absolute positions, then
    `pre_layrnorm` (`pre_norm`) when configured."""

    config: ml_collections.ConfigDict
    patch_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, tiles: jax.Array) -> jax.Array:
        c = self.config
        if tiles.shape[1] != c.image_size or tiles.shape[2] != c.image_size:
            raise ValueError(f"clip stem expects {c.image_size}px tiles, got {tiles.shape[1:3]}")
        x = Dense(c.width, (axes.PATCH, axes.EMBED), use_bias=self.patch_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="patch_embed")(patchify(tiles, c.patch_size))
        # Unit scale, matching the fan-in patch embedding, so positions are not drowned by content
        # when training from scratch (imported weights replace these anyway).
        init = nn.initializers.normal(stddev=1.0)
        cls = self.param("cls_token", nn.with_logical_partitioning(init, (axes.EMBED,)), (c.width,),
                         self.param_dtype)
        pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, axes.EMBED)),
                         (x.shape[1] + 1, c.width), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (x.shape[0], 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + jnp.asarray(pos, self.dtype)
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_norm")(x)
        return x


class QwenVLStem(nn.Module):
    """Bias-free patch embedding, no class token, a learned `pos_grid` x `pos_grid` position table resized
    bicubically (as PyTorch does, in fp32) to the tile's patch grid, so one table serves 224 and 448 px
    tiles; then `ln_pre` (`pre_norm`)."""

    config: ml_collections.ConfigDict
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, tiles: jax.Array) -> jax.Array:
        c = self.config
        if c.drop_cls:
            raise ValueError("the qwenvl stem has no class token: set drop_cls=False")
        x = Dense(c.width, (axes.PATCH, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="patch_embed")(patchify(tiles, c.patch_size))
        # Unit scale, as in the clip stem.
        pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                                                   (None, axes.EMBED)),
                         (c.pos_grid ** 2, c.width), self.param_dtype)
        x = x + resize_grid(jnp.asarray(pos), c.pos_grid, tiles.shape[1] // c.patch_size).astype(self.dtype)
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_norm")(x)
        return x


class NavitStem(nn.Module):
    """Bias-free linear embedding of pre-cut patches: HF Qwen2-VL's Conv3d (stride = kernel) on patches the
    processor already flattened in (C, T, kh, kw) order. Positions enter later, as 2-D RoPE in every block."""

    config: ml_collections.ConfigDict
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        c = self.config
        dim = 3 * c.temporal_patch_size * c.patch_size ** 2
        if patches.ndim != 3 or patches.shape[-1] != dim:
            raise ValueError(f"navit stem expects patches [B, N, {dim}], got {patches.shape}")
        if c.drop_cls:
            raise ValueError("the navit stem has no class token: set drop_cls=False")
        return Dense(c.width, (axes.PATCH, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="patch_embed")(patches)


STEMS: dict[str, Callable[..., nn.Module]] = {
    "clip": ClipStem, "navit": NavitStem, "eva": functools.partial(ClipStem, patch_bias=True),
    "qwenvl": QwenVLStem}
# qkv_bias: "qkv" (CLIP) or "qv" (EVA: the checkpoint's fused bias has a zero key slice).
QKV_BIAS = ("qkv", "qv")


class ViTBlock(nn.Module):
    width: int
    heads: int
    mlp_dim: int
    mlp_act: str
    norm_eps: float
    rope_base: float | None = None  # 2-D RoPE over patch (row, col): the navit stem
    qkv_bias: str = "qkv"
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        o = self.options
        h = LayerNorm(self.norm_eps, name="norm1", **o.dtypes)(x)
        x = x + SelfAttention(self.heads, self.heads, self.width // self.heads, causal=False, qkv_bias=True,
                              k_bias=self.qkv_bias == "qkv", out_bias=True,
                              rope_base=self.rope_base, rope_kind="2d", backend=o.attention,
                              max_segments=o.max_segments, name="attn", lora=o.lora,
                              **o.dtypes)(h, positions, segment_ids)
        h = LayerNorm(self.norm_eps, name="norm2", **o.dtypes)(x)
        x = x + MLP(self.mlp_dim, self.mlp_act, name="mlp", lora=o.lora, **o.dtypes)(h)
        return nn.with_logical_constraint(x, axes.BLE), None


class ViT(nn.Module):
    config: ml_collections.ConfigDict  # model.vision
    options: ModuleOptions = ModuleOptions()

    @property
    def num_blocks(self) -> int:
        """Blocks feeding hidden_states[feature_layer]."""
        depth, layer = self.config.depth, self.config.feature_layer
        if not -(depth + 1) <= layer <= depth:
            raise ValueError(f"feature_layer {layer} is outside hidden_states of a depth-{depth} ViT")
        return layer % (depth + 1)

    @nn.compact
    def __call__(
        self, pixels: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Tiles [N, S, S, 3], or for the navit stem packed patches with their positions and segment ids
        (module docstring)."""
        c = self.config
        if c.stem not in STEMS:
            raise ValueError(f"unknown vision stem {c.stem!r}; choose from {sorted(STEMS)}")
        if c.qkv_bias not in QKV_BIAS:
            raise ValueError(f"unknown vision qkv_bias {c.qkv_bias!r}; choose from {QKV_BIAS}")
        o = self.options
        packed = () if positions is None else (positions, segment_ids)
        if (c.stem == "navit") != bool(packed):
            raise ValueError("patch positions and segment ids go with the navit stem, and only with it")
        x = STEMS[c.stem](c, name="stem", **o.dtypes)(pixels)
        x = nn.with_logical_constraint(x, axes.BLE)
        block = dict(width=c.width, heads=c.heads, mlp_dim=c.mlp_dim, mlp_act=c.mlp_act, norm_eps=c.norm_eps,
                     qkv_bias=c.qkv_bias, rope_base=c.rope_base if c.stem == "navit" else None, options=o)
        x = run_blocks(ViTBlock, block, x, *packed, num_layers=self.num_blocks, scan=o.scan_layers,
                       remat_policy=o.remat_policy)
        if c.post_norm:
            x = LayerNorm(c.norm_eps, name="post_norm", **o.dtypes)(x)
        return x[:, 1:] if c.drop_cls else x
