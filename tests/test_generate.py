import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.test_model_vlm import random_params, tiny_model_config
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.model import VLM

B, T, S, P = 2, 2, 28, 4
LP, NEW = 14, 6  # prompt buffer, new tokens
LENGTHS = np.array([12, 7])
MODEL = VLM(tiny_model_config())


def _prompts() -> dict[str, np.ndarray]:
    """Right-padded prompts of different lengths: row 0 has a 2-tile image at 2..9, row 1 a 1-tile image
    at 1..4 (its second tile slot is padding)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 101, (B, LP)).astype(np.int32)
    segment_ids = (np.arange(LP)[None] < LENGTHS[:, None]).astype(np.int32)
    tokens *= segment_ids
    dest = np.full((B, T * P), LP, np.int32)
    dest[0] = np.arange(2, 2 + 2 * P)
    dest[1, :P] = np.arange(1, 1 + P)
    tile_mask = np.array([[True, True], [True, False]])
    tiles = rng.standard_normal((B, T, S, S, 3)).astype(np.float32) * tile_mask[:, :, None, None, None]
    return dict(tokens=tokens, segment_ids=segment_ids, images=dict(tiles=tiles, tile_mask=tile_mask, image_dest=dest))


PROMPTS = _prompts()


@functools.cache
def _params() -> dict:
    p = PROMPTS
    positions = np.broadcast_to(np.arange(LP), (B, LP))
    return random_params(MODEL, p["tokens"], positions, p["segment_ids"], p["images"])


@jax.jit
def _full_logits(params, tokens, segment_ids):
    p = PROMPTS
    length = tokens.shape[1]
    dest = np.where(p["images"]["image_dest"] == LP, length, p["images"]["image_dest"])
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    return MODEL.apply({"params": params}, tokens, positions, segment_ids, dict(p["images"], image_dest=dest))


def _uncached_greedy(params) -> tuple[np.ndarray, list[np.ndarray]]:
    """Re-run the whole model on the growing sequence; returns new ids [B, NEW] and each step's logits."""
    buf = np.zeros((B, LP + NEW), np.int32)
    buf[:, :LP] = PROMPTS["tokens"]
    rows, out, step_logits = np.arange(B), np.zeros((B, NEW), np.int32), []
    for i in range(NEW):
        segment_ids = (np.arange(LP + NEW)[None] < (LENGTHS + i)[:, None]).astype(np.int32)
        logits = np.asarray(_full_logits(params, buf, segment_ids))[rows, LENGTHS + i - 1]
        step_logits.append(logits)
        out[:, i] = buf[rows, LENGTHS + i] = logits.argmax(-1)
    return out, step_logits


_generate = jax.jit(functools.partial(generate, MODEL, max_new_tokens=NEW))


def _cached(params, stop_id: int) -> np.ndarray:
    p = PROMPTS
    stop = stop_sequences([[stop_id]] if stop_id >= 0 else [])
    return np.asarray(_generate(params, p["tokens"], p["segment_ids"], p["images"], stop=stop))


def test_cached_greedy_equals_uncached_greedy():
    params = _params()
    want, _ = _uncached_greedy(params)
    assert len(set(map(tuple, want))) == B  # rows really differ
    np.testing.assert_array_equal(_cached(params, stop_id=-1), want)


def test_each_row_stops_at_the_stop_id():
    params = _params()
    want, _ = _uncached_greedy(params)
    stop = int(want[1, 2])
    expected = want.copy()
    for row in expected:
        hits = np.flatnonzero(row == stop)
        if hits.size:
            row[hits[0] + 1:] = 0
    np.testing.assert_array_equal(_cached(params, stop_id=stop), expected)


def test_prefill_and_decode_logits_match_full_forward():
    params, p = _params(), PROMPTS
    want_ids, want_logits = _uncached_greedy(params)
    positions = np.broadcast_to(np.arange(LP), (B, LP))
    prefill = jax.jit(functools.partial(MODEL.apply, method=VLM.prefill, mutable=["cache"]), static_argnums=5)
    decode = jax.jit(functools.partial(MODEL.apply, method=VLM.decode_step, mutable=["cache"]))
    logits, state = prefill({"params": params}, p["tokens"], positions, p["segment_ids"], p["images"], LP + NEW)
    np.testing.assert_allclose(np.asarray(logits), want_logits[0], atol=1e-5)
    for i in range(1, NEW):
        logits, state = decode({"params": params, **state}, want_ids[:, i - 1], LENGTHS + i - 1)
        np.testing.assert_allclose(np.asarray(logits), want_logits[i], atol=1e-5)
