"""Batched greedy decoding with the KV cache: one prefill over the prompts (with their images), then one
cached decode step per new token."""

from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.model import VLM


def next_rope_position(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B]: the RoPE position of the first token after each right-padded prompt (positions [B, L] or M-RoPE
    [B, L, 3]): one past the prompt's largest id on any axis, where HF Qwen2-VL's rope_deltas put the text that
    follows. With 1-D positions 0, 1, 2, ... that is the prompt length."""
    largest = positions.max(axis=-1) if positions.ndim == 3 else positions
    return (jnp.max(jnp.where(segment_ids > 0, largest, -1), axis=1) + 1).astype(jnp.int32)


def greedy_generate(
    model: VLM, params: Any, tokens: jax.Array, segment_ids: jax.Array, images: dict[str, jax.Array], *,
    max_new_tokens: int, stop_id: int | jax.Array, pad_id: int | jax.Array = 0, positions: jax.Array | None = None,
) -> jax.Array:
    """Greedy continuation of right-padded prompts -> generated ids [B, max_new_tokens].

    `images`: the prompts' images, the arrays of the model's image-input kind (vlm_jax/image_inputs/, e.g.
    `kind.select` of a `kind.pad_prompts` batch). One example per row; its prompt is the
    tokens where segment_ids > 0. Each row stops after emitting `stop_id` (kept in the output) and is filled
    with `pad_id` from then on; the loop ends early once every row has stopped. jit with `model` closed over
    and `max_new_tokens` static; `stop_id`/`pad_id` may be traced.

    `positions`: the prompts' RoPE positions, [B, L] (by default 0, 1, 2, ...) or for an M-RoPE decoder
    [B, L, 3] (ids from the images' grids). New token i of a row fills cache slot n + i (n = the prompt's
    length) and, being text, takes RoPE position `next_rope_position` + i on every axis.
    """
    b, length = tokens.shape
    lengths = jnp.sum(segment_ids > 0, axis=1).astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    first_position = next_rope_position(positions, segment_ids)
    logits, state = model.apply(
        {"params": params}, tokens, positions, segment_ids, images, length + max_new_tokens, method=VLM.prefill,
        mutable=["cache"])
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry: tuple) -> jax.Array:
        i, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, done, cache, out = carry
        # The token emitted at step i-1 goes in: cache slot n + i - 1, RoPE position first_position + i - 1.
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        step_positions = first_position + i - 1
        if positions.ndim == 3:
            step_positions = jnp.repeat(step_positions[:, None], 3, axis=1)
        step_logits, state = model.apply(
            {"params": params, "cache": cache}, prev, step_positions, lengths + i - 1, method=VLM.decode_step,
            mutable=["cache"])
        tok = jnp.where(done, pad_id, jnp.argmax(step_logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, done | (tok == stop_id), state["cache"], out

    _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first == stop_id, state["cache"], out))
    return out
