"""Next-token losses: per-token NLL from logits, or the training loss computed a chunk of positions at a time
with its gradients in the same pass (`chunked_loss`), so that no fp32 logits over every position are held."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlm_jax import parallel


def in_vocab(targets: jax.Array, vocab_size: int) -> jax.Array:
    """Where target ids are vocabulary ids. The others are image placeholders (LLaVA's -200, or an id at or past
    the vocabulary size) under a zero loss mask: the NLL functions give them NaN without gathering at them."""
    return (targets >= 0) & (targets < vocab_size)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Logits [..., vocab] and target ids [...] -> per-token fp32 NLL [...]; NaN where a target is outside
    the vocabulary (`in_vocab`), as `chunked_loss` gives."""
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


def _rows_in_chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
    """[B, L, ...] -> [n, B, chunk, ...], n = ceil(L / chunk), the end padded with `fill`."""
    b, length = x.shape[:2]
    n = -(-length // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)


def _rows_whole(x: jax.Array, length: int) -> jax.Array:
    """The inverse of `_rows_in_chunks`: [n, B, chunk, ...] -> [B, L, ...]."""
    n, b, chunk = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])[:, :length]


@jax.custom_vjp
def matmul_t(x: jax.Array, w: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [..., E] @ w [E, V], whose gradient at x is the product with `w_t`, w's transpose [V, E] held as its own
    array: each chunk of `chunked_loss` then pulls its logits' gradient back through a row-major product instead of
    one that contracts the last dimension of both operands, which XLA's CPU matmul runs at half speed. `w_t` gets no
    gradient (w's is the whole of it)."""
    return x @ w


def _matmul_t_fwd(x, w, w_t):
    return x @ w, (x, w_t)


def _matmul_t_bwd(residuals, d):
    x, w_t = residuals
    return d @ w_t, jnp.einsum("...e,...v->ev", x, d), None


matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


def transposed(w: jax.Array) -> jax.Array:
    """w.T materialised (matmul_t's `w_t`): the barrier keeps the compiler from folding the transpose back into
    the product."""
    return jax.lax.optimization_barrier(jax.lax.stop_gradient(w).T)


def _along_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, L, ...] reordered along L by index [B, L]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _fused_pass(project: Callable[[Any, Any], jax.Array], chunk: int, vocab_size: int, acts: Any, params: Any,
                targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, Any, Any]:
    """(sum of weights x NLL, per-token NLL, its gradients w.r.t. acts and params): `chunked_loss`'s one pass."""
    length = targets.shape[1]
    # Each (joined) row's positions of nonzero weight first (stable, so in order), and a chunk past every row's
    # last one skipped: image placeholders, prompts and padding cost no product of the output matrix.
    order = jnp.argsort((weights == 0).astype(jnp.int32), axis=1, stable=True)
    fullest = (weights != 0).sum(axis=1).max()
    split = functools.partial(_rows_in_chunks, chunk=chunk)
    xs = (jax.tree.map(lambda a: split(_along_rows(a, order), fill=0), acts), split(_along_rows(targets, order),
          fill=-1), split(_along_rows(weights, order), fill=0))
    starts = jnp.arange(xs[1].shape[0]) * chunk

    def compute(d_params, a, t, w):
        logits, vjp = jax.vjp(lambda a, p: project(a, p).astype(jnp.float32), a, params)
        valid = in_vocab(t, vocab_size)
        top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
        exp = jnp.exp(logits - top)
        total = exp.sum(axis=-1, keepdims=True)
        lse = (top + jnp.log(total))[..., 0]
        target = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], -1)[..., 0]
        nll = jnp.where(valid & (w != 0), lse - target, jnp.nan)
        # d(w * nll) / d logits = w * (softmax - onehot(target)): positions of weight 0 contribute nothing.
        onehot = jnp.arange(logits.shape[-1]) == jnp.where(valid, t, -1)[..., None]
        d_logits = w[..., None] * (exp / total - onehot)
        d_a, d_p = vjp(d_logits)
        d_params = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), d_params, d_p)
        return d_params, (jnp.where(w != 0, nll, 0.0) * w, nll, d_a)

    def skip(d_params, a, t, w):
        return d_params, (jnp.zeros(w.shape), jnp.full(w.shape, jnp.nan), jax.tree.map(jnp.zeros_like, a))

    def body(d_params, xs):
        a, t, w, start = xs
        return jax.lax.cond(start < fullest, compute, skip, d_params, a, t, w)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    d_params, (weighted, nll, d_acts) = jax.lax.scan(body, zeros, (*xs, starts))
    back = jnp.argsort(order, axis=1)
    d_acts = jax.tree.map(lambda g: _along_rows(_rows_whole(g, length), back), d_acts)
    d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, params)
    return weighted.sum(), _along_rows(_rows_whole(nll, length), back), d_acts, d_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(project, chunk, vocab_size, acts, params, targets, weights):
    total, nll, _, _ = _fused_pass(project, chunk, vocab_size, acts, params, targets, weights)
    return total, nll


def _fused_fwd(project, chunk, vocab_size, acts, params, targets, weights):
    total, nll, d_acts, d_params = _fused_pass(project, chunk, vocab_size, acts, params, targets, weights)
    return (total, nll), (d_acts, d_params, jnp.where(weights != 0, nll, 0.0))


def _fused_bwd(project, chunk, vocab_size, residuals, cotangents):
    d_acts, d_params, nll = residuals
    g = cotangents[0]  # the NLL output leaves `chunked_loss` without a gradient: its cotangent is 0
    scale = functools.partial(jax.tree.map, lambda x: (g * x).astype(x.dtype))
    return scale(d_acts), scale(d_params), None, g * nll


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_loss(project: Callable[[Any, Any], jax.Array], acts: Any, params: Any, targets: jax.Array,
                 weights: jax.Array, vocab_size: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum over positions of weights x NLL, per-token fp32 NLL [B, L] without a gradient, NaN where the weight is
    0) of `targets`, the logits of `chunk` positions of each device's rows at a time: neither pass holds more than
    one fp32 [chunk, vocab] block a device, and a chunk without a position of nonzero weight is never computed.

    `project(acts, params)` -> logits [G, C, vocab] of a chunk of the activations `acts` (a pytree of [B, L, ...]
    arrays, cut along L) under the output parameters `params` (a pytree, whole). The weighted sum's gradients
    come out of the same pass that computes it: each chunk's logits, their softmax, the gradient of its weighted
    NLL at the logits, and that pulled back through `project` (three products of the output matrix per chunk,
    where autodiff of a chunked loss recomputes the logits for a fourth); the backward pass only scales them.
    Positions of weight 0 take no part in the sum or its gradients, and cost nothing once the weighted ones are
    past: the rows each device holds are joined into one row of its G (the batch's shards on the mesh in context,
    `parallel.batch_shards_in_context`; 1 without one), its weighted positions moved to its front (in order)
    before it is cut into chunks, and a chunk holding none in any of the G is skipped. A LLaVA batch then pays the
    output matrix for its answer tokens, not for its image placeholders, prompts and padding, nor for a row with
    few answer tokens beside one with many; joining only a device's own rows keeps the reordering on the device."""
    b, length = targets.shape
    groups = parallel.batch_shards_in_context(b)

    def merged(x: jax.Array) -> jax.Array:
        return x.reshape(groups, b // groups * length, *x.shape[2:])

    total, nll = _fused(project, chunk, vocab_size, jax.tree.map(merged, acts), params, merged(targets),
                        merged(weights.astype(jnp.float32)))
    return total, jax.lax.stop_gradient(nll.reshape(b, length))
