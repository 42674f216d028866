"""Choosing each generated token: transformers' logits processors for `generate` (repetition penalty, then
with sampling temperature, top-k and top-p, in that order), then argmax or a draw."""

import dataclasses
import math

import jax
import jax.numpy as jnp

from vlm_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `generate` picks tokens; the defaults are greedy decoding, what evaluation uses.

    The fields are Python numbers that the decoding program is traced with (the dataclass is hashable, so a
    caller closes over it or passes it as a static argument): each setting compiles its own program, holding
    only the steps it uses. Greedy evaluation so keeps its plain argmax with no per-step sort over the
    vocabulary, and top-k gets the static k that `lax.top_k` needs; a chat that changes a setting recompiles."""
    temperature: float = 0.0  # 0: greedy (argmax); > 0: draw from softmax(logits / temperature)
    top_k: int = 0  # sampling only: keep the k largest logits (and any tied with the k-th); 0: off
    top_p: float = 1.0  # sampling only: keep the smallest set of largest logits holding >= top_p of the mass
    repetition_penalty: float = 1.0  # > 1 discourages every id already in the row (prompt + generated); 1: off

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"sampling: temperature {self.temperature} must be >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"sampling: top_k {self.top_k!r} must be an integer >= 0 (0 is off)")
        if not 0 <= self.top_p <= 1:
            raise InputError(f"sampling: top_p {self.top_p} must be in [0, 1] (1 is off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InputError(f"sampling: repetition_penalty {self.repetition_penalty} must be > 0 (1 is off)")


def seen_ids(ids: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, V]: which ids occur where `valid` ([B, L]) in `ids` [B, L]. Ids outside [0, V) (LLaVA's -200
    image placeholder, an image id after the vocabulary) are no token the model can emit: left out."""
    keep = valid & (ids >= 0) & (ids < vocab_size)
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    # Left-out ids go to an extra column that is dropped, so nothing wraps or clips onto a real id.
    return jnp.zeros((ids.shape[0], vocab_size + 1), bool).at[rows, jnp.where(keep, ids, vocab_size)].set(
        True)[:, :vocab_size]


def process_logits(logits: jax.Array, seen: jax.Array | None, sampling: Sampling) -> jax.Array:
    """float32 [B, V]: `logits` [B, V] as transformers' processors leave them for `generate` (do_sample when
    temperature > 0): RepetitionPenaltyLogitsProcessor over `seen` (bool [B, V]; None when the penalty is
    off), then TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper with min_tokens_to_keep=1;
    removed tokens are -inf. Among tokens tied at the top-p cut the lower ids go first, where torch's unstable
    sort picks any of them: the number kept is the same."""
    x = logits.astype(jnp.float32)
    if sampling.repetition_penalty != 1.0:
        x = jnp.where(seen, jnp.where(x < 0, x * sampling.repetition_penalty, x / sampling.repetition_penalty), x)
    if sampling.temperature == 0:
        return x
    x = x / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(x, min(sampling.top_k, x.shape[-1]))[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampling.top_p < 1.0:
        order = jnp.argsort(x, axis=-1, stable=True)  # ascending
        mass = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
        drop = (mass <= 1 - sampling.top_p).at[:, -1].set(False)
        rows = jnp.arange(x.shape[0])[:, None]
        x = jnp.where(jnp.zeros_like(drop).at[rows, order].set(drop), -jnp.inf, x)
    return x


def next_tokens(logits: jax.Array, seen: jax.Array | None, sampling: Sampling, key: jax.Array | None) -> jax.Array:
    """int32 [B]: argmax of the processed `logits` [B, V] (greedy), or one draw per row with `key`."""
    x = process_logits(logits, seen, sampling)
    if sampling.temperature == 0:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
