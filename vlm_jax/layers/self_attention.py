"""Multi-head self-attention block (projections, optional RoPE, optional KV cache) for ViTs and decoders,
also run as cross-attention (keys and values from a `context`, e.g. the BLIP-2 Q-Former's image features).

KV cache ('cache' collection, `key`/`value` [B, cache_len, Hkv, D]): `cache_mode="prefill"` runs the
prompt as usual and writes its k/v into slots [0, L); `cache_mode="decode"` takes one token per row and
writes it at its `cache_slots` entry, then attends to slots <= that one. A per-row write index is what lets
right-padded prompts of different lengths decode together: each row overwrites its own padding as it goes,
and padding slots beyond a row's slot stay masked. This needs one unpacked example per row (true for
generation prompts). The slot is not the RoPE position: with 1-D positions 0, 1, 2, ... the two are equal,
but M-RoPE positions of a prompt with images run behind its token count (data/navit.py mrope_positions).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike

from vlm_jax.layers import axes
from vlm_jax.layers.attention import attention
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.lora import LoraSpec
from vlm_jax.layers.rope import apply_rope, cos_sin
from vlm_jax.layers.scan import ATTENTION_OUT

CACHE_MODES = ("none", "prefill", "decode")


class SelfAttention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    qkv_bias: bool = False
    # False leaves only the key projection without its bias (EVA ViT-g: q and v biases only). A key bias
    # adds the same q.b to every score of a query, so the output never depends on it.
    k_bias: bool = True
    out_bias: bool = False
    rope_base: float | None = None  # None: no RoPE
    rope_kind: str = "1d"  # layers/rope.py: 1d, 2d (ViT patch rows/cols) or mrope
    rope_sections: tuple[int, ...] = ()  # mrope only
    cache_mode: str = "none"
    cache_len: int = 0
    backend: str = "xla"  # layers/attention.py BACKENDS (config model.attention)
    max_segments: int = 64  # packed segments per row the cudnn backend holds (config model.max_segments)
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
        context: jax.Array | None = None, key_context: jax.Array | None = None,
        cache_slots: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, L, E]; positions [B, L] (needed for RoPE; [B, L, 2] or [B, L, 3] for the 2d and mrope RoPE
        kinds); segment_ids [B, L] or None; cache_slots [B, 1]: where decode writes each row's token.

        context [B, Lc, Ec]: cross-attention, keys and values projected from it (no mask, RoPE or cache);
        key_context [B, Lc, Ec]: the keys' input instead of context (Qwen-VL's resampler adds positions to its
        keys only)."""
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"unknown cache_mode {self.cache_mode!r}; choose from {CACHE_MODES}")
        if context is not None and (self.rope_base is not None or self.cache_mode != "none" or segment_ids is not None):
            raise ValueError("cross-attention (context) takes no RoPE, KV cache or segment ids")
        if key_context is not None and context is None:
            raise ValueError("key_context goes with context (cross-attention)")
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        q = dense((self.num_heads, self.head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                  use_bias=self.qkv_bias, name="q_proj")(x)
        kv_shape, kv_names = (self.num_kv_heads, self.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM)
        v_input = x if context is None else context
        k_input = v_input if key_context is None else key_context
        k = dense(kv_shape, kv_names, use_bias=self.qkv_bias and self.k_bias, name="k_proj")(k_input)
        v = dense(kv_shape, kv_names, use_bias=self.qkv_bias, name="v_proj")(v_input)
        q = nn.with_logical_constraint(q, axes.BLHD)
        k = nn.with_logical_constraint(k, axes.BLKD)
        v = nn.with_logical_constraint(v, axes.BLKD)
        if self.rope_base is not None:
            cos, sin = cos_sin(self.rope_kind, positions, self.head_dim, self.rope_base, self.rope_sections)
            # HF's Qwen2-VL vision tower rotates in fp32 and casts back; the decoders rotate in the activation dtype.
            dtype = jnp.float32 if self.rope_kind == "2d" else q.dtype
            q, k = (apply_rope(t.astype(dtype), cos, sin).astype(t.dtype) for t in (q, k))

        if self.cache_mode == "decode":
            k, v = self._decode_write(k, v, cache_slots)
            slots = jnp.arange(k.shape[1])[None]
            out = attention(q, k, v, causal=True, q_positions=cache_slots, kv_positions=slots,
                            backend=self.backend)
        else:
            out = attention(q, k, v, causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                            backend=self.backend, max_segments=self.max_segments)
            if self.cache_mode == "prefill":
                self._prefill_write(k, v)
        out = checkpoint_name(nn.with_logical_constraint(out, axes.BLHD), ATTENTION_OUT)
        return dense(x.shape[-1], (axes.HEADS, axes.HEAD_DIM, axes.EMBED), axis=(-2, -1),
                     use_bias=self.out_bias, name="o_proj")(out)

    def _prefill_write(self, k: jax.Array, v: jax.Array) -> None:
        b, length, hkv, d = k.shape
        if self.cache_len < length:
            raise ValueError(f"cache_len {self.cache_len} is shorter than the prompt ({length})")
        for name, new in (("key", k), ("value", v)):
            slot = self.variable("cache", name, jnp.zeros, (b, self.cache_len, hkv, d), new.dtype)
            slot.value = nn.with_logical_constraint(
                jax.lax.dynamic_update_slice_in_dim(slot.value, new, 0, axis=1), axes.BLKD)

    def _decode_write(
        self, k: jax.Array, v: jax.Array, cache_slots: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        if k.shape[1] != 1:
            raise ValueError(f"decode takes one token per row, got {k.shape[1]}")
        if cache_slots is None:
            raise ValueError("decode needs cache_slots [B, 1], the slot each row's token goes to")
        if not self.has_variable("cache", "key"):
            raise ValueError("decode needs the 'cache' collection filled by a prefill call")
        out = []
        for name, new in (("key", k), ("value", v)):
            slot = self.variable("cache", name)
            hit = jnp.arange(slot.value.shape[1])[None, :] == cache_slots
            slot.value = nn.with_logical_constraint(
                jnp.where(hit[:, :, None, None], new.astype(slot.value.dtype), slot.value), axes.BLKD)
            out.append(slot.value)
        return out[0], out[1]
