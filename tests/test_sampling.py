"""Sampling under jit: the logit processing equals transformers' processors; `generate` draws repeatably from a
key, stops on multi-token sequences and streams each step's tokens to the host, on one device and on a
batch-sharded mesh."""

import functools

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from configs.base import get_config
from tests.test_generate import LENGTHS, LP, MODEL, NEW, PROMPTS, _full_logits, _params
from vlm_jax import parallel
from vlm_jax.errors import InputError
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.sampling import Sampling, process_logits, seen_ids

V = 300  # past 200, so LLaVA's -200 would index a real id if it were not left out


def _torch_processors(s: Sampling) -> LogitsProcessorList:
    """transformers' processors for generate(do_sample=temperature > 0) with `s`, in _get_logits_processor's
    order and with its conditions."""
    out = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.temperature > 0:
        if s.temperature != 1.0:
            out.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            out.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            out.append(TopPLogitsWarper(s.top_p))
    return out


def _both(logits: np.ndarray, ids: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """(process_logits, transformers) on `logits` [B, V] with `ids` [B, L] seen. transformers' penalty drops
    ids >= V itself but indexes with a negative one, so the reference gets those as V."""
    seen = seen_ids(ids, np.ones(ids.shape, bool), V) if s.repetition_penalty != 1.0 else None
    ours = np.asarray(jax.jit(process_logits, static_argnums=2)(logits, seen, s))
    with torch.no_grad():
        want = _torch_processors(s)(torch.from_numpy(np.where(ids < 0, V, ids)).long(), torch.from_numpy(logits))
    return ours, want.numpy()


def _ids(rng: np.random.Generator) -> np.ndarray:
    """Seen ids [4, 12]: repeats, LLaVA's -200 placeholder and an id past the vocabulary among them."""
    ids = rng.integers(0, V, (4, 12))
    ids[0, 3] = ids[2, 5] = -200
    ids[1, 0] = V + 3
    return ids


SETTINGS = [
    Sampling(repetition_penalty=1.3),  # greedy: only the penalty applies
    Sampling(repetition_penalty=0.7),  # < 1 favours the seen ids
    Sampling(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2),
    Sampling(temperature=1.5),
    Sampling(temperature=1.0, top_p=0.5),
    Sampling(temperature=0.5, top_k=V + 20),  # k past the vocabulary keeps everything
    Sampling(temperature=1.0, top_p=1e-8),  # keeps only the largest (min_tokens_to_keep=1)
    Sampling(temperature=2.0, top_p=0.0),
    Sampling(temperature=1.0, top_k=1, repetition_penalty=1.1),
]


@pytest.mark.parametrize("s", SETTINGS, ids=str)
def test_process_logits_equals_transformers_processors(s):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    ours, want = _both(logits, _ids(rng), s)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(want))
    assert np.isfinite(ours).any(axis=1).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], want[np.isfinite(want)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("s", [Sampling(temperature=1.0, top_k=4), Sampling(temperature=0.8, top_k=7, top_p=0.6),
                               Sampling(temperature=1.0, top_p=0.4), Sampling(temperature=1.0, top_p=0.5),
                               Sampling(temperature=1.0, top_p=1e-8)], ids=str)
def test_ties_keep_what_transformers_keeps(s):
    """Logits on a coarse grid, so many tie. top-k keeps every token tied with the k-th, as transformers does;
    at a top-p cut inside a tie, torch's unstable sort keeps any of the tied tokens, vlm_jax the higher ids:
    the same number, and the two kept sets differ only among tokens of the cut's value. In the last row four
    tokens hold all the mass, a quarter each, exactly: top_p 0.5 keeps two (a mass of exactly 1 - top_p goes)."""
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, (6, V)).astype(np.float32)
    logits[5] = -200  # exp(-200) is 0 in float32
    logits[5, [3, 40, 41, 100]] = 0
    ours, want = _both(logits, np.zeros((6, 1), np.int64), s)  # no penalty here: the ids are unused
    kept, kept_want = np.isfinite(ours), np.isfinite(want)
    np.testing.assert_array_equal(kept.sum(axis=1), kept_want.sum(axis=1))
    np.testing.assert_allclose(ours[kept & kept_want], want[kept & kept_want], rtol=1e-6)
    for row in range(len(logits)):
        moved = kept[row] != kept_want[row]
        assert len(set(logits[row, moved])) <= 1, row
    assert kept[5].sum() == {0.6: 3, 0.5: 2, 0.4: 2}.get(s.top_p, 4 if s.top_k else 1)
    if s.top_p == 1.0:
        np.testing.assert_array_equal(kept, kept_want)
        assert (kept.sum(axis=1) > s.top_k).any()  # a tie at the k-th really kept more than k


def test_sampling_settings_are_checked():
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_k=2.5), dict(top_p=1.5),
                dict(repetition_penalty=0.0)):
        with pytest.raises(InputError, match=f"sampling: {next(iter(bad))} "):
            Sampling(**bad)
    with pytest.raises(InputError, match="stop sequences"):
        stop_sequences([[3], []])
    np.testing.assert_array_equal(stop_sequences([[3], [4, 5]]), [[3, -1], [4, 5]])
    assert stop_sequences([]).shape == (0, 1)


NO_STOP = stop_sequences([])


def _run(params, sampling: Sampling = Sampling(), rng=None, stop=NO_STOP, on_token=None, prompts=PROMPTS):
    p = prompts
    fn = jax.jit(functools.partial(generate, MODEL, max_new_tokens=NEW, sampling=sampling, on_token=on_token))
    return np.asarray(fn(params, p["tokens"], p["segment_ids"], p["images"], stop=stop, rng=rng))


def _uncached(params, choose) -> np.ndarray:
    """New ids [B, NEW] from re-running the whole model on the growing sequence, each token chosen by
    `choose(logits [B, V], ids so far [B, L])` (every prompt id and the generated ones)."""
    b = len(LENGTHS)
    buf = np.zeros((b, LP + NEW), np.int32)
    buf[:, :LP] = PROMPTS["tokens"]
    rows, out = np.arange(b), np.zeros((b, NEW), np.int32)
    for i in range(NEW):
        segment_ids = (np.arange(LP + NEW)[None] < (LENGTHS + i)[:, None]).astype(np.int32)
        logits = np.asarray(_full_logits(params, buf, segment_ids))[rows, LENGTHS + i - 1]
        seen = [np.concatenate([buf[r, :LENGTHS[r]], out[r, :i]]) for r in rows]
        out[:, i] = buf[rows, LENGTHS + i] = [choose(logits[r:r + 1], seen[r][None])[0] for r in rows]
    return out


def _greedy_after(processors: LogitsProcessorList):
    def choose(logits, ids):
        with torch.no_grad():
            return processors(torch.from_numpy(ids).long(), torch.from_numpy(logits)).argmax(-1).numpy()
    return choose


def test_greedy_repetition_penalty_equals_transformers_on_the_uncached_model():
    params = _params()
    plain = _uncached(params, _greedy_after(LogitsProcessorList()))
    np.testing.assert_array_equal(_run(params), plain)
    for penalty in (3.0, 0.3):
        want = _uncached(params, _greedy_after(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)])))
        assert (want != plain).any(), penalty  # the penalty changes the tokens
        np.testing.assert_array_equal(_run(params, Sampling(repetition_penalty=penalty)), want)


def test_draws_repeat_with_a_key_and_top_k_1_is_greedy():
    params = _params()
    hot = Sampling(temperature=5.0)
    a = _run(params, hot, jax.random.key(0))
    np.testing.assert_array_equal(_run(params, hot, jax.random.key(0)), a)
    assert (_run(params, hot, jax.random.key(1)) != a).any()
    assert (a != _run(params)).any()
    np.testing.assert_array_equal(_run(params, Sampling(temperature=2.0, top_k=1), jax.random.key(3)), _run(params))
    with pytest.raises(InputError, match="needs an rng key"):
        _run(params, hot)


def _stopped(ids: np.ndarray, stops: list[list[int]]) -> np.ndarray:
    """`ids` [B, N] cut after the first point where a row ends with one of `stops`, padded with 0."""
    out = ids.copy()
    for row in out:
        ends = [i for i in range(len(row)) if any(list(row[max(0, i + 1 - len(s)):i + 1]) == s for s in stops)]
        if ends:
            row[ends[0] + 1:] = 0
    return out


def test_a_two_token_stop_sequence_mid_generation():
    params = _params()
    want = _run(params)
    pair = want[0, 2:4].tolist()
    stops = [pair, [pair[1] + 1]]  # the second is a single id that neither row emits
    assert (want != pair[1] + 1).all()
    expected = _stopped(want, stops)
    assert (expected[0, 4:] == 0).all() and (expected[0, :4] == want[0, :4]).all()  # row 0 stops at step 3
    np.testing.assert_array_equal(expected[1], want[1])  # row 1 never stops
    np.testing.assert_array_equal(_run(params, stop=stop_sequences(stops)), expected)
    # Only the first id of the pair is no stop.
    np.testing.assert_array_equal(_run(params, stop=stop_sequences([[pair[0], pair[1] + 1]])), want)


def _streamed(params, sampling: Sampling, rng, stop, prompts=PROMPTS) -> tuple[np.ndarray, np.ndarray]:
    steps, tokens = [], []

    def on_token(step, toks):
        steps.append(int(step))
        tokens.append(np.array(toks))

    out = _run(params, sampling, rng, stop, on_token, prompts)
    jax.effects_barrier()  # the callbacks may still be running when the result is ready
    assert steps == list(range(len(steps))), steps
    return out, np.stack(tokens, axis=1)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.5, top_p=0.9)], ids=str)
def test_streamed_tokens_equal_the_returned_ones_on_one_device_and_a_mesh(sampling):
    params = _params()
    rng = jax.random.key(7)
    want = _run(params, sampling, rng)
    stop = stop_sequences([[int(want[0, 1])], [int(want[1, 3])]])  # both rows stop early, at different steps
    out, streamed = _streamed(params, sampling, rng, stop)
    assert 1 < streamed.shape[1] < NEW and (out[:, streamed.shape[1]:] == 0).all()
    np.testing.assert_array_equal(streamed, out[:, :streamed.shape[1]])

    # Eight rows split over the eight fake devices, as evaluation puts a batch.
    mesh = parallel.make_mesh(get_config().mesh)
    assert parallel.data_parallel_size(mesh) == 8
    eight = jax.tree.map(lambda x: np.concatenate([x] * 4), PROMPTS)
    eight = jax.device_put(eight, parallel.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        sharded, streamed = _streamed(params, sampling, rng, NO_STOP, eight)
    assert sharded.shape == (8, NEW)
    np.testing.assert_array_equal(streamed, sharded)
    if sampling.temperature == 0:
        np.testing.assert_array_equal(sharded, np.concatenate([want] * 4))
