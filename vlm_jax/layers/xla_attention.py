"""The xla attention backend (layers/attention.py): plain XLA ops, for CPUs, tests and GPUs without the cuDNN
kernel. q [B, Lq, H, D], k/v [B, Lk, Hkv, D]; scores laid out [B, Hkv, Lq, G, Lk] (G = H // Hkv, the queries of a
kv head), the order both products give and take without moving the [L, L] blocks.

Causal self-attention longer than BLOCK runs a block of BLOCK queries at a time (`causal_blocks`), each against a
window of keys that ends at its last query: the whole prefix, or with packed segments the shortest of the windows
of BLOCK x 2^k keys that still reaches back to the start of every one of its queries' segments (the smallest
segment start over the block's queries and the batch's rows) for a block whose prefix is longer than WHOLE_PREFIX
keys. A block of a packed row's fourth example then skips the keys of the first three, as well as everything above
the diagonal. The window is picked at run time (a `lax.switch` over the few static sizes). The backward is written
out for the whole pass (a custom VJP): each block recomputes its probabilities in its own window, returns its
queries' gradient as is and adds its keys' and values' into one fp32 buffer in place, so that no block's
gradients are padded to the whole row and summed, and no probabilities are kept between the passes."""

import functools

import jax
import jax.numpy as jnp

BLOCK = 128  # queries per block of `causal_blocks`, and its smallest key window
# A block's prefix up to this many keys is taken whole: a shorter window saves less than the switch costs.
WHOLE_PREFIX = 4 * BLOCK
_FILL = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row (padding) stays uniform instead of NaN


def mask(
    lq: int, lk: int, causal: bool,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
    q_positions: jax.Array | None, kv_positions: jax.Array | None,
) -> jax.Array | None:
    """[B or 1, Lq, Lk] boolean, True where attention is allowed; None when everything is allowed."""
    allowed = None
    if q_segment_ids is not None:
        allowed = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        if q_positions is None:
            q_positions, kv_positions = jnp.arange(lq)[None], jnp.arange(lk)[None]
        order = kv_positions[:, None, :] <= q_positions[:, :, None]
        allowed = order if allowed is None else allowed & order
    return allowed


def _grouped(q: jax.Array, hkv: int) -> jax.Array:
    b, lq, h, d = q.shape
    return q.reshape(b, lq, hkv, h // hkv, d)


def _scores(q: jax.Array, k: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """fp32 scaled scores [B, Hkv, Lq, G, Lk], `_FILL` where not allowed ([B or 1, Lq, Lk])."""
    s = jnp.einsum("bqhgd,bkhd->bhqgk", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32)
    s = s * (q.shape[-1] ** -0.5)
    return s if allowed is None else jnp.where(allowed[:, None, :, None], s, _FILL)


def _apply(probs: jax.Array, v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.einsum("bhqgk,bkhd->bqhgd", probs.astype(v.dtype), v).reshape(shape)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """One masked pass with fp32 softmax: q [B, Lq, H, D] against all of k, v."""
    return _apply(jax.nn.softmax(_scores(q, k, allowed), axis=-1), v, q.shape)


def segment_starts(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """[B, L]: the first key index of each query's segment (L where no key has it). Ids are clipped to [0, L], so
    ids past L share a start: an earlier one, which only widens a window."""
    length = kv_segment_ids.shape[1]
    ids = jnp.clip(kv_segment_ids, 0, length)
    first = jax.vmap(lambda i: jnp.full(length + 1, length, jnp.int32).at[i].min(jnp.arange(length,
                                                                                           dtype=jnp.int32)))(ids)
    return jnp.take_along_axis(first, jnp.clip(q_segment_ids, 0, length), axis=1)


def _windows(end: int) -> tuple[int, ...]:
    """The key windows of a block ending at `end`: BLOCK x 2^k keys while shorter than the prefix, then the prefix."""
    sizes, size = [], BLOCK
    while size < end:
        sizes.append(size)
        size *= 2
    return (*sizes, end)


def _block_allowed(start: int, end: int, size: int, segmented: bool, q_seg: jax.Array,
                   kv_seg: jax.Array) -> jax.Array:
    """`mask` for queries start..end-1 against the keys end-size..end-1."""
    segments = (q_seg, kv_seg[:, end - size:end]) if segmented else (None, None)
    return mask(end - start, size, True, *segments, jnp.arange(start, end)[None], jnp.arange(end - size, end)[None])


def _probs(size: int, start: int, segmented: bool, q: jax.Array, k: jax.Array, q_seg: jax.Array,
           kv_seg: jax.Array) -> jax.Array:
    """Probabilities of the queries start.. of block `q` against the last `size` keys of its prefix."""
    end = start + q.shape[1]
    return jax.nn.softmax(_scores(q, k[:, end - size:end], _block_allowed(start, end, size, segmented, q_seg,
                                                                           kv_seg)), axis=-1)


def _block_forward(start: int, segmented: bool, size: int, q, k, v, q_seg, kv_seg) -> jax.Array:
    end = start + q.shape[1]
    return _apply(_probs(size, start, segmented, q, k, q_seg, kv_seg), v[:, end - size:end], q.shape)


def _block_backward(start: int, segmented: bool, size: int, q, k, v, q_seg, kv_seg, d_out, dk, dv):
    """(dq of the block, dk and dv with the block's gradients against the last `size` keys of its prefix added)."""
    end, hkv, d = start + q.shape[1], k.shape[2], q.shape[-1]
    kw, vw = k[:, end - size:end], v[:, end - size:end]
    p = _probs(size, start, segmented, q, k, q_seg, kv_seg)
    d_grouped = _grouped(d_out, hkv)
    dp = jnp.einsum("bqhgd,bkhd->bhqgk", d_grouped, vw, preferred_element_type=jnp.float32)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * (d ** -0.5)
    dq = jnp.einsum("bhqgk,bkhd->bqhgd", ds.astype(q.dtype), kw).reshape(q.shape)
    dkw = jnp.einsum("bhqgk,bqhgd->bkhd", ds.astype(k.dtype), _grouped(q, hkv), preferred_element_type=jnp.float32)
    dvw = jnp.einsum("bhqgk,bqhgd->bkhd", p.astype(v.dtype), d_grouped.astype(v.dtype),
                     preferred_element_type=jnp.float32)
    return dq, dk.at[:, end - size:end].add(dkw), dv.at[:, end - size:end].add(dvw)


def _pick(window: jax.Array, sizes: tuple[int, ...], branch, *args):
    """branch(size, *args) for sizes[window]; a static call when there is one size."""
    if len(sizes) == 1:
        return branch(sizes[0], *args)
    return jax.lax.switch(window, [functools.partial(branch, size) for size in sizes], *args)


def _segments(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
              length: int) -> tuple[bool, jax.Array, jax.Array]:
    """(segmented, q and kv segment ids): one segment of zeros when there are none."""
    if q_segment_ids is None:
        return False, jnp.zeros((1, length), jnp.int32), jnp.zeros((1, length), jnp.int32)
    return True, q_segment_ids, kv_segment_ids


def _tied(q_seg: jax.Array, kv_seg: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The segment ids behind one barrier with `x`, a value of this layer. The masks depend on the segment ids
    alone, which are the same in every layer: XLA would hoist them out of a scan over the layers and out of the
    window `lax.switch`, and hold every block's masks for every window size, broadcast over the heads, through
    the whole pass. Tied to `x`, each block builds its mask where it uses it, inside the taken branch."""
    return jax.lax.optimization_barrier((q_seg, kv_seg, x))


def _blocks(length: int, segmented: bool) -> list[tuple[int, tuple[int, ...]]]:
    """(start, key window sizes) of every block of queries."""
    blocks = []
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        blocks.append((start, _windows(end) if segmented and end > WHOLE_PREFIX else (end,)))
    return blocks


def _window(starts: jax.Array, start: int, sizes: tuple[int, ...]) -> jax.Array:
    """Index into `sizes` of the shortest window that reaches every segment start of the block's queries."""
    if len(sizes) == 1:
        return jnp.zeros((), jnp.int32)
    reach = sizes[-1] - starts[:, start:start + BLOCK].min()
    return (reach > jnp.array(sizes[:-1])).sum().astype(jnp.int32)


@jax.custom_vjp
def causal_blocks(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
) -> jax.Array:
    """Causal self-attention a block of BLOCK queries at a time, each against its key window (module docstring):
    the same values as one masked pass."""
    return _causal_forward(q, k, v, q_segment_ids, kv_segment_ids)[0]


def _causal_forward(q, k, v, q_segment_ids, kv_segment_ids):
    segmented, q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, q.shape[1])
    q_seg, kv_seg, q = _tied(q_seg, kv_seg, q)
    starts = segment_starts(q_seg, kv_seg) if segmented else None
    outs, windows = [], []
    for start, sizes in _blocks(q.shape[1], segmented):
        end = start + BLOCK
        windows.append(_window(starts, start, sizes))
        outs.append(_pick(windows[-1], sizes, functools.partial(_block_forward, start, segmented),
                          q[:, start:end], k, v, q_seg[:, start:end], kv_seg))
    return jnp.concatenate(outs, axis=1), (q, k, v, q_segment_ids, kv_segment_ids, windows)


def _causal_backward(residuals, d_out):
    q, k, v, q_segment_ids, kv_segment_ids, windows = residuals
    segmented, q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, q.shape[1])
    q_seg, kv_seg, d_out = _tied(q_seg, kv_seg, d_out)
    dk, dv, dqs = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), []
    for (start, sizes), window in zip(_blocks(q.shape[1], segmented), windows):
        end = start + BLOCK
        dq, dk, dv = _pick(window, sizes, functools.partial(_block_backward, start, segmented),
                           q[:, start:end], k, v, q_seg[:, start:end], kv_seg, d_out[:, start:end], dk, dv)
        dqs.append(dq)
    return jnp.concatenate(dqs, axis=1), dk.astype(k.dtype), dv.astype(v.dtype), None, None


causal_blocks.defvjp(_causal_forward, _causal_backward)
