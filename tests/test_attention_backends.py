"""The attention backends selected by model.attention: the splash kernel (run by its Pallas interpreter on CPU)
equals the masked xla path on packed rows; the cudnn backend's packed layout describes exactly the segments;
the config reaches every self-attention layer of the vision tower and the decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ROOT, TINY
from vlm_jax.config import load_config
from vlm_jax.layers import attention as attention_lib
from vlm_jax.layers.attention import attention, segment_layout, splash_attention
from vlm_jax.model import VLM, forward_method
from vlm_jax.train.loop import dummy_inputs

B, L, H, HKV, D = 2, 128, 4, 2, 16
SEGMENTS = np.zeros((B, L), np.int32)
SEGMENTS[0, :50], SEGMENTS[0, 50:101], SEGMENTS[0, 101:120] = 1, 2, 3
SEGMENTS[1, :128] = 1


def _qkv():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, HKV, D)),
            jax.random.normal(kv, (B, L, HKV, D)))


def test_splash_equals_the_masked_path_on_packed_rows():
    q, k, v = _qkv()
    seg = jnp.asarray(SEGMENTS)
    want = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    got = splash_attention(q, k, v, causal=True, segment_ids=seg, interpret=True)
    real = SEGMENTS > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_cudnn_segment_layout_describes_the_segments():
    lengths, offsets = segment_layout(jnp.asarray(SEGMENTS), max_segments=4)
    assert lengths.tolist() == [[50, 51, 19, -1], [128, -1, -1, -1]]
    assert offsets.tolist() == [[0, 50, 101, -1, -1], [0, -1, -1, -1, -1]]
    # The block-diagonal mask these describe is the segment-id mask on every real token.
    for row in range(B):
        owner = np.zeros(L, np.int32)
        for s, (start, n) in enumerate(zip(offsets[row].tolist(), lengths[row].tolist()), start=1):
            if n > 0:
                owner[start:start + n] = s
        np.testing.assert_array_equal(owner, SEGMENTS[row])


def test_unknown_backend_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*'splash'"):
        attention(q, k, v, causal=True, backend="flash")


def test_config_selects_the_backend_of_every_self_attention(monkeypatch):
    calls = []

    def spy(q, k, v, causal, segment_ids):
        calls.append((q.shape, causal))
        return attention(q, k, v, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)

    monkeypatch.setattr(attention_lib, "splash_attention", spy)
    # 128 patch slots and 128 tokens: both sequences are whole splash blocks.
    config = load_config(f"{ROOT}/configs/demo_navit.py", TINY + [
        "model.attention=splash", "model.scan_layers=False", "data.max_patches_per_row=128"])
    jax.eval_shape(functools.partial(VLM(config.model).init, method=forward_method(config.model)),
                   jax.random.PRNGKey(0), *dummy_inputs(config))
    vision, text = config.model.vision.depth, config.model.text.layers
    assert [c for _, c in calls].count(False) == vision and [c for _, c in calls].count(True) == text
