"""Next-token losses: per-token NLL from logits, or from a vocabulary walked in chunks of columns so that
neither the forward nor the backward pass holds fp32 logits over the whole vocabulary."""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def in_vocab(targets: jax.Array, vocab_size: int) -> jax.Array:
    """Where target ids are vocabulary ids. The others are image placeholders (LLaVA's -200, or an id at or past
    the vocabulary size) under a zero loss mask: the NLL functions give them NaN without gathering at them."""
    return (targets >= 0) & (targets < vocab_size)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Logits [..., vocab] and target ids [...] -> per-token fp32 NLL [...]; NaN where a target is outside
    the vocabulary (`in_vocab`), as `chunked_token_nll` gives."""
    logits = logits.astype(jnp.float32)
    valid = in_vocab(targets, logits.shape[-1])
    # Gathered at id 0 instead: take_along_axis fills NaN past the vocabulary and wraps ids in [-vocab, 0).
    target = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, jnp.nan)


def masked_sum(nll: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed per-token loss over masked positions, and the number of those positions. What masked-out
    positions hold (NaN for placeholder targets) reaches neither the sum nor its gradient."""
    mask = mask.astype(jnp.float32)
    # Selected, not only multiplied: NaN x 0 is NaN.
    return (jnp.where(mask > 0, nll, 0.0) * mask).sum(), mask.sum()


def masked_mean(nll: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean per-token loss over masked positions, and the number of those positions."""
    total, count = masked_sum(nll, mask)
    return total / jnp.maximum(count, 1.0), count


def masked_nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss over masked positions, and the number of those positions."""
    return masked_sum(token_nll(logits, targets), mask)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token loss over masked positions, and the number of those positions."""
    return masked_mean(token_nll(logits, targets), mask)


def vocab_chunks(weight: jax.Array, axis: int, chunk: int) -> jax.Array:
    """`weight` with its vocabulary `axis` (size V) cut into n = ceil(V / chunk) chunks of `chunk` columns,
    stacked on a new leading axis. Chunk i holds columns i, i + n, i + 2n, ... (zeros past V): strided rather
    than contiguous, so a vocabulary sharded in contiguous blocks stays split over the same devices within
    every chunk instead of each chunk living on one device."""
    vocab = weight.shape[axis]
    n = -(-vocab // chunk)
    pad = [(0, n * chunk - vocab) if a == axis else (0, 0) for a in range(weight.ndim)]
    weight = jnp.pad(weight, pad).reshape(*weight.shape[:axis], chunk, n, *weight.shape[axis + 1:])
    return jnp.moveaxis(weight, axis + 1, 0)


def chunked_token_nll(column_logits: Callable[[Any], jax.Array], chunks: Any, targets: jax.Array,
                      vocab_size: int) -> jax.Array:
    """Per-token fp32 NLL [B, L] of `targets`, walking the vocabulary one chunk of columns at a time.

    `chunks`: a pytree whose leaves hold the n chunks of `vocab_chunks` on their leading axis;
    `column_logits(one chunk)` -> fp32 logits [B, L, C] of that chunk's columns. The scan carries the running
    max, the sum of exponentials below it and the target's logit; its body is rematerialised, so the backward
    pass recomputes each chunk's logits and neither pass holds more than one [B, L, C] block (the chunks'
    gradients come out stacked like `chunks`). A target outside the vocabulary matches no column: NaN, as in
    `token_nll`."""
    n = jax.tree.leaves(chunks)[0].shape[0]

    def body(carry, xs):
        top, total, target = carry
        i, chunk = xs
        logits = column_logits(chunk)
        ids = jnp.arange(logits.shape[-1]) * n + i
        logits = jnp.where(ids < vocab_size, logits, -jnp.inf)  # the padding columns past the vocabulary
        # As in jax.nn.logsumexp the max only keeps exp in range: the result does not depend on it.
        new_top = jnp.maximum(top, jax.lax.stop_gradient(logits.max(axis=-1)))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(axis=-1)
        target = target + jnp.where(ids == targets[..., None], logits, 0.0).sum(axis=-1)
        return (new_top, total, target), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros)
    (top, total, target), _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), init, (jnp.arange(n), chunks))
    return jnp.where(in_vocab(targets, vocab_size), top + jnp.log(total) - target, jnp.nan)
