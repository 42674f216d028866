import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers.attention import attention
from vlm_jax.layers.xla_attention import (BLOCK, WHOLE_PREFIX, _blocks, _windows, causal_blocks, mask,
                                         segment_starts, xla_attention)

B, L, H, HKV, D = 2, 12, 4, 2, 8
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0],
                     [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0]], np.int32)


def _qkv(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, HKV, D)),
            jax.random.normal(kv, (B, L, HKV, D)))


def _reference(q, k, v, mask):
    """Plain MHA with k/v heads repeated and an explicit [B, Lq, Lk] mask."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    k, v = np.repeat(k, H // HKV, axis=2), np.repeat(v, H // HKV, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_segments_are_isolated(causal):
    q, k, v = _qkv()
    seg = jnp.asarray(SEGMENTS)
    out = attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    in_two = (SEGMENTS == 2)[:, :, None, None]
    q2, k2, v2 = _qkv(seed=1)
    out2 = attention(jnp.where(in_two, q2, q), jnp.where(in_two, k2, k),
                     jnp.where(in_two, v2, v), causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    others = SEGMENTS != 2
    np.testing.assert_allclose(np.asarray(out2)[others], np.asarray(out)[others], rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(out2)[~others], np.asarray(out)[~others])


@pytest.mark.parametrize("causal", [False, True])
def test_matches_repeated_kv_mha_reference(causal):
    q, k, v = _qkv()
    mask = SEGMENTS[:, :, None] == SEGMENTS[:, None, :]
    if causal:
        mask &= np.tril(np.ones((L, L), bool))[None]
    seg = jnp.asarray(SEGMENTS)
    out = attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), atol=1e-5)
    # GQA grouping equals running MHA on explicitly repeated k/v heads.
    mha = attention(q, jnp.repeat(k, H // HKV, axis=2), jnp.repeat(v, H // HKV, axis=2), causal=causal,
                    q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(mha), atol=1e-6)


def test_causal_ignores_the_future():
    q, k, v = _qkv()
    out = attention(q, k, v, causal=True)
    _, k2, v2 = _qkv(seed=1)
    later = (jnp.arange(L) >= 7)[None, :, None, None]
    out2 = attention(q, jnp.where(later, k2, k), jnp.where(later, v2, v), causal=True)
    np.testing.assert_allclose(np.asarray(out2)[:, :7], np.asarray(out)[:, :7], rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(out2)[:, 7:], np.asarray(out)[:, 7:])


def test_padding_and_fully_masked_rows_are_finite():
    q, k, v = _qkv()
    q_seg = jnp.asarray([[0] * L, [5] * L], jnp.int32)  # all padding; a segment with no keys at all
    kv_seg = jnp.asarray([[0] * L, [1] * L], jnp.int32)
    for causal in (False, True):
        out = attention(q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
        assert np.isfinite(np.asarray(out)).all()


def test_explicit_positions_reproduce_one_causal_row():
    """A single query at position j against all keys (the KV-cache decode case) equals row j of the full
    causal attention."""
    q, k, v = _qkv()
    full = attention(q, k, v, causal=True)
    j = jnp.asarray([[4], [9]])
    q_one = jnp.take_along_axis(q, j[:, :, None, None], axis=1)
    one = attention(q_one, k, v, causal=True, q_positions=j, kv_positions=jnp.arange(L)[None])
    expect = np.stack([np.asarray(full)[0, 4], np.asarray(full)[1, 9]])
    np.testing.assert_allclose(np.asarray(one)[:, 0], expect, atol=1e-6)


# Packed rows of 8 x BLOCK + 44 tokens as (segment ids, run lengths) per row: a segment from near the start, so
# every block takes its whole prefix; segments that let the blocks past WHOLE_PREFIX take windows of BLOCK,
# 2 x BLOCK and 4 x BLOCK keys; a segment id that comes back after another (not a layout the packer makes, but one
# the windows must still hold).
LAYOUTS = {
    "prefix": (([1, 2, 3, 0], [100, 600, 300, 68]), ([1, 2], [7, 1061])),
    "windows": (([1, 2, 3, 0], [300, 460, 260, 48]), ([1, 2, 3, 0], [350, 400, 250, 68])),
    "returning": (([1, 2, 1, 0], [300, 400, 300, 68]), ([1, 2, 3], [600, 300, 168])),
    "unpacked": None,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_blocks_equal_one_masked_pass(layout):
    """Causal self-attention longer than BLOCK runs a block of queries at a time against a window of keys ending
    at its last query: the outputs and gradients of the one [L, L] masked pass (packed segments with padding, a
    length that is not a multiple of the block, GQA)."""
    length = 8 * BLOCK + 44
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(ks[0], (B, length, H, D)), jax.random.normal(ks[1], (B, length, HKV, D)),
               jax.random.normal(ks[2], (B, length, HKV, D)))
    seg = None if LAYOUTS[layout] is None else jnp.asarray(
        np.stack([np.repeat(ids, runs) for ids, runs in LAYOUTS[layout]]).astype(np.int32))
    cotangent = jax.random.normal(ks[3], q.shape)

    def run(blocked: bool):
        def f(q, k, v):
            if blocked:
                return jax.jit(functools.partial(attention, causal=True, q_segment_ids=seg,
                                                 kv_segment_ids=seg))(q, k, v)
            allowed = mask(length, length, True, seg, seg, None, None)
            return xla_attention(q, k, v, allowed)
        out, pull = jax.vjp(f, q, k, v)
        return out, pull(cotangent)

    (want, want_grads), (got, got_grads) = run(False), run(True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_scanned_layers_do_not_hold_every_windows_mask():
    """The masks depend on the segment ids alone, the same in every layer; a scan over layers must still build
    each block's mask in its own window branch, not hold every block's mask for every window size through the
    pass: the compiled gradient of two scanned layers needs less memory than one byte per entry of those masks."""
    length = 16 * BLOCK + 44
    runs = [length // 4] * 3 + [length - 3 * (length // 4)]
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], runs)] * B).astype(np.int32))

    def layers(q, k, v):
        return jax.lax.scan(lambda x, _: (causal_blocks(x, k, v, seg, seg), None), q, None, length=2)[0].sum()

    shapes = [jax.ShapeDtypeStruct((B, length, heads, D), jnp.float32) for heads in (H, HKV, HKV)]
    compiled = jax.jit(jax.grad(layers, (0, 1, 2))).lower(*shapes).compile()
    masks = sum(B * H * BLOCK * size for _, sizes in _blocks(length, True) for size in sizes)
    assert compiled.memory_analysis().temp_size_in_bytes < masks


def test_segment_starts_and_windows():
    """Each query's window reaches back to the first key of its segment: the first occurrence of its id, also when
    the id comes back later in the row; the windows of a block are BLOCK x 2^k keys, then its whole prefix."""
    seg = jnp.asarray([[1, 1, 2, 2, 2, 1, 0, 0], [3, 3, 3, 3, 9, 9, 9, 9]], jnp.int32)
    np.testing.assert_array_equal(segment_starts(seg, seg), [[0, 0, 2, 2, 2, 0, 6, 6], [0, 0, 0, 0, 4, 4, 4, 4]])
    assert _windows(BLOCK) == (BLOCK,)
    assert _windows(4 * BLOCK + 44) == (BLOCK, 2 * BLOCK, 4 * BLOCK, 4 * BLOCK + 44)
