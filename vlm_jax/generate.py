"""Batched decoding with the KV cache: one prefill over the prompts (with their images), then one cached decode
step per new token, each token picked greedily or drawn (vlm_jax/sampling.py)."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from vlm_jax import parallel
from vlm_jax.errors import InputError
from vlm_jax.model import VLM
from vlm_jax.sampling import Sampling, next_tokens, seen_ids


def next_rope_position(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B]: the RoPE position of the first token after each right-padded prompt (positions [B, L] or M-RoPE
    [B, L, 3]): one past the prompt's largest id on any axis, where HF Qwen2-VL's rope_deltas put the text that
    follows. With 1-D positions 0, 1, 2, ... that is the prompt length."""
    largest = positions.max(axis=-1) if positions.ndim == 3 else positions
    return (jnp.max(jnp.where(segment_ids > 0, largest, -1), axis=1) + 1).astype(jnp.int32)


def stop_sequences(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """int32 [S, K]: `generate`'s `stop` from S token-id sequences, right-padded with -1 (at least [S, 1])."""
    if any(not seq or min(seq) < 0 for seq in sequences):
        raise InputError(f"stop sequences {list(map(list, sequences))}: each needs at least one id, all >= 0")
    out = np.full((len(sequences), max(map(len, sequences), default=1)), -1, np.int32)
    for row, seq in zip(out, sequences):
        row[:len(seq)] = seq
    return out


def ends_with_stop(tail: jax.Array, stop: jax.Array) -> jax.Array:
    """bool [B]: whether each row of `tail` (int32 [B, K], its last K generated ids, -1 before the first) ends
    with one of the stop sequences `stop` [S, K] (right-padded with -1; an all -1 row never matches)."""
    k = stop.shape[1]
    n = jnp.sum(stop >= 0, axis=1)
    # Stop id j of sequence s must sit at tail column k - n[s] + j (the sequence aligned to the tail's end).
    cols = jnp.clip(jnp.arange(k)[None] + k - n[:, None], 0, k - 1)
    hit = jnp.all((stop < 0) | (tail[:, cols] == stop), axis=-1) & (n > 0)
    return jnp.any(hit, axis=1)


def generate(
    model: VLM, params: Any, tokens: jax.Array, segment_ids: jax.Array, images: dict[str, jax.Array], *,
    max_new_tokens: int, stop: jax.Array, pad_id: int | jax.Array = 0, positions: jax.Array | None = None,
    sampling: Sampling = Sampling(), rng: jax.Array | None = None,
    on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> jax.Array:
    """Continuations of right-padded prompts -> generated ids [B, max_new_tokens].

    `images`: the prompts' images, the arrays of the model's image-input kind (vlm_jax/image_inputs/, e.g.
    `kind.select` of a `kind.pad_prompts` batch). One example per row; its prompt is the tokens where
    segment_ids > 0. `stop` (int32 [S, K], `stop_sequences`): a row stops once its generated ids end with one
    of the S sequences (kept in the output) and is filled with `pad_id` from then on; the loop ends early once
    every row has stopped. jit with `model`, `sampling` and `on_token` closed over and `max_new_tokens`
    static; `stop`, `pad_id` and `rng` may be traced.

    `sampling`: greedy by default; with temperature > 0 each row's token i is drawn with
    `fold_in(rng, i)`, so a key gives the same tokens on every run. `on_token(step, tokens)`: called on the
    host, in order, once per decoding step with the step's index and its tokens [B] (`pad_id` in rows that
    have stopped), for printing text as it decodes; the calls may still be running when the result is ready
    (`jax.effects_barrier()` waits for them). None compiles no callback in.

    `positions`: the prompts' RoPE positions, [B, L] (by default 0, 1, 2, ...) or for an M-RoPE decoder
    [B, L, 3] (ids from the images' grids). New token i of a row fills cache slot n + i (n = the prompt's
    length) and, being text, takes RoPE position `next_rope_position` + i on every axis.
    """
    if sampling.temperature > 0 and rng is None:
        raise InputError(f"generate: sampling at temperature {sampling.temperature} needs an rng key")
    stop = jnp.asarray(stop, jnp.int32)
    if stop.ndim != 2:
        raise InputError(f"generate: stop must be int32 [S, K] (stop_sequences), not of shape {stop.shape}")
    b, length = tokens.shape
    lengths = jnp.sum(segment_ids > 0, axis=1).astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    first_position = next_rope_position(positions, segment_ids)
    logits, state = model.apply(
        {"params": params}, tokens, positions, segment_ids, images, length + max_new_tokens, method=VLM.prefill,
        mutable=["cache"])
    seen = seen_ids(tokens, segment_ids > 0, logits.shape[-1]) if sampling.repetition_penalty != 1.0 else None
    rows = jnp.arange(b)

    def emit(i: jax.Array, logits: jax.Array, done: jax.Array, seen: jax.Array | None, tail: jax.Array) -> tuple:
        """Token i of every row from its logits: (tokens [B], done, seen, tail) after it."""
        key = None if rng is None else jax.random.fold_in(rng, i)
        tok = jnp.where(done, pad_id, next_tokens(logits, seen, sampling, key))
        if on_token is not None:
            # Under a mesh the rows are gathered here: left to the callback's move to one device, XLA warns of
            # an "involuntary full rematerialization" at every compile.
            io_callback(on_token, None, i, parallel.whole_in_context(tok), ordered=True)
        if seen is not None:
            seen = seen.at[rows, tok].set(True)
        tail = jnp.concatenate([tail[:, 1:], tok[:, None]], axis=1)
        return tok, done | ends_with_stop(tail, stop), seen, tail

    first, done, seen, tail = emit(jnp.int32(0), logits, jnp.zeros((b,), bool), seen,
                                   jnp.full((b, stop.shape[1]), -1, jnp.int32))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry: tuple) -> jax.Array:
        i, done = carry[:2]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, done, seen, tail, cache, out = carry
        # The token emitted at step i-1 goes in: cache slot n + i - 1, RoPE position first_position + i - 1.
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        step_positions = first_position + i - 1
        if positions.ndim == 3:
            step_positions = jnp.repeat(step_positions[:, None], 3, axis=1)
        step_logits, state = model.apply(
            {"params": params, "cache": cache}, prev, step_positions, lengths + i - 1, method=VLM.decode_step,
            mutable=["cache"])
        tok, done, seen, tail = emit(i, step_logits, done, seen, tail)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, done, seen, tail, state["cache"], out

    return jax.lax.while_loop(cond, body, (jnp.int32(1), done, seen, tail, state["cache"], out))[-1]
