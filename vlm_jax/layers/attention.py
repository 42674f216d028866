"""The one attention function every model uses.

q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]. Masking combines
  * segment ids: a query attends only to keys of the same segment, so packed examples never see each
    other (0 = padding, which then only sees padding and stays finite);
  * causality: by explicit positions when given (KV-cache decoding, where the query sits at its own
    position within a long cache), otherwise by array index.
GQA groups the H query heads into Hkv groups of H // Hkv heads sharing one k/v head (no k/v copies).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _mask(
    lq: int, lk: int, causal: bool,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
    q_positions: jax.Array | None, kv_positions: jax.Array | None,
) -> jax.Array | None:
    """[B or 1, Lq, Lk] boolean, True where attention is allowed; None when everything is allowed."""
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        if q_positions is None:
            q_positions, kv_positions = jnp.arange(lq)[None], jnp.arange(lk)[None]
        order = kv_positions[:, None, :] <= q_positions[:, :, None]
        mask = order if mask is None else mask & order
    return mask


def _xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
) -> jax.Array:
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:
        # A finite fill keeps fully-masked rows (padding) uniform instead of NaN.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, h, d)


_BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": _xla_attention}


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with fp32 softmax; see the module docstring for the masking rules."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("pass both q_positions and kv_positions, or neither")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads do not divide into {k.shape[2]} kv heads")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {sorted(_BACKENDS)}")
    mask = _mask(q.shape[1], k.shape[1], causal, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    return _BACKENDS[backend](q, k, v, mask)
