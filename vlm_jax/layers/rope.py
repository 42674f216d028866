"""Rotary position embeddings, HF "rotate_half" (GPT-NeoX) convention, from explicit positions.

Three kinds share `apply_rope` and differ only in how the cos/sin tables are laid out over the head dim:
  1d     positions [B, L]: LLaMA / Qwen2 decoders.
  2d     positions [B, L, 2] = (row, col) of each patch: the Qwen2-VL / NaViT vision tower. The head dim is
         split in four quarters [row freqs, col freqs, row freqs, col freqs], one set of head_dim/4
         frequencies computed over head_dim/2 (HF `Qwen2VLVisionRotaryEmbedding`).
  mrope  positions [B, L, 3] = (temporal, row, col): the Qwen2-VL decoder's multimodal RoPE. The head_dim/2
         frequencies of 1-D RoPE are cut into `sections`, section i taking its angles from axis i % 3
         (HF `Qwen2VLRotaryEmbedding`, mrope_section [16, 24, 24] at head_dim 128).
"""

import jax
import jax.numpy as jnp

ROPE_KINDS = ("1d", "2d", "mrope")


def _inv_freq(dim: int, base: float) -> jax.Array:
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_cos_sin(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] -> cos, sin [B, L, head_dim] in fp32, with cos/sin = cat(freqs, freqs)."""
    freqs = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim, base)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def axial_rope_cos_sin(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, L, 2] (row, col) -> cos, sin [B, L, head_dim] laid out [row, col, row, col]."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head_dim divisible by 4, got {head_dim}")
    freqs = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim // 2, base)  # [B, L, 2, D/4]
    freqs = freqs.reshape(*positions.shape[:-1], head_dim // 2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(
    positions: jax.Array, head_dim: int, base: float, sections: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """positions [B, L, 3] (t, h, w) -> cos, sin [B, L, head_dim]; `sections` sum to head_dim / 2."""
    if sum(sections) != head_dim // 2:
        raise ValueError(f"mrope sections {sections} must sum to head_dim / 2 = {head_dim // 2}")
    freqs = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim, base)  # [B, L, 3, D/2]
    axis = jnp.repeat(jnp.arange(len(sections)) % 3, jnp.asarray(sections), total_repeat_length=head_dim // 2)
    freqs = jnp.take_along_axis(freqs, axis[None, None, None, :], axis=-2)[..., 0, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def cos_sin(
    kind: str, positions: jax.Array, head_dim: int, base: float, sections: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """The cos/sin tables of RoPE `kind` (see the module docstring for each kind's positions)."""
    want_rank = {"1d": 2, "2d": 3, "mrope": 3}
    if kind not in want_rank:
        raise ValueError(f"unknown rope kind {kind!r}; choose from {ROPE_KINDS}")
    if positions.ndim != want_rank[kind]:
        raise ValueError(f"{kind} RoPE takes positions of rank {want_rank[kind]}, got shape {positions.shape}")
    if kind == "1d":
        return rope_cos_sin(positions, head_dim, base)
    if kind == "2d":
        return axial_rope_cos_sin(positions, head_dim, base)
    return mrope_cos_sin(positions, head_dim, base, sections)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, D]; cos/sin [B, L, D] broadcast over heads."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
