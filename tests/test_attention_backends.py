"""The attention backends selected by model.attention: the splash kernel (run by its Pallas interpreter on CPU)
equals the masked xla path on packed rows, at any length, alone and on a mesh, forward and backward; on a mesh
each device runs the kernel on its own rows and whole GQA groups (the wrapper the cudnn backend shares), and the
real kernel compiles for a multi-chip TPU mesh; the cudnn backend's packed layout describes exactly the segments;
the config reaches every self-attention layer of the vision tower and the decoder."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.helpers import ROOT, TINY
from vlm_jax import parallel
from vlm_jax.config import load_config
from vlm_jax.layers import attention as attention_lib
from vlm_jax.layers.attention import attention, pallas_interpreter, segment_layout
from vlm_jax.image_inputs import dummy_inputs
from vlm_jax.model import VLM

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
    with pallas_interpreter():
        got = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, backend="splash")
    real = SEGMENTS > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


MESHES = {"fsdp2_tensor4": (1, 2, 4), "data8": (8, 1, 1)}


def _mesh(name: str) -> jax.sharding.Mesh:
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, MESHES[name]))))


def _packed_case(b: int, length: int, hkv: int, segments: bool):
    """q [b, length, 8, 16], k and v [b, length, hkv, 16], and packed rows: segments of random lengths laid out
    from index 0, some rows ending in padding (0), one row a single segment; or no segment ids at all."""
    rng = np.random.default_rng(length + hkv)
    ids = np.zeros((b, length), np.int32)
    for row in range(b):
        end = length if row % 2 else int(rng.integers(length // 2, length))
        cuts = np.sort(rng.choice(np.arange(1, end), size=row % 4, replace=False))
        for s, (lo, hi) in enumerate(zip((0, *cuts), (*cuts, end)), start=1):
            ids[row, lo:hi] = s
    kq, kk, kv = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(kq, (b, length, 8, 16))
    k, v = (jax.random.normal(key, (b, length, hkv, 16)) for key in (kk, kv))
    return q, k, v, (jnp.asarray(ids) if segments else None)


def _loss_and_grads(backend: str, q, k, v, seg, causal: bool):
    """jit(value_and_grad) of a weighted sum over the real tokens (padding outputs are not defined the same way
    by every backend), with the output as aux."""
    real = jnp.ones(q.shape[:2], bool) if seg is None else seg > 0
    weights = jax.random.normal(jax.random.key(7), q.shape)

    def loss(q, k, v):
        out = attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg, backend=backend)
        return jnp.sum(jnp.where(real[:, :, None, None], out * weights, 0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(real), out, grads


@pytest.mark.parametrize("mesh_name, causal, hkv, segments", [
    ("fsdp2_tensor4", True, 2, True),  # 2 kv heads over 4 head shards: repeated to 4
    ("fsdp2_tensor4", False, 4, True),
    ("data8", True, 4, True),
    ("data8", False, 2, False),
])
def test_splash_on_a_mesh_equals_the_masked_path_at_any_length(mesh_name, causal, hkv, segments):
    q, k, v, seg = _packed_case(8, 200, hkv, segments)  # 200: not a multiple of the 128-token blocks
    real, want, want_grads = _loss_and_grads("xla", q, k, v, seg, causal)
    with jax.set_mesh(_mesh(mesh_name)), nn.logical_axis_rules(parallel.LOGICAL_RULES), pallas_interpreter():
        _, got, got_grads = _loss_and_grads("splash", q, k, v, seg, causal)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("backend, kernel", [("splash", "_splash_local"), ("cudnn", "_cudnn_attention")])
@pytest.mark.parametrize("b, local_b", [(8, 4), (3, 3)])  # a batch fsdp 2 does not divide stays whole
def test_each_device_runs_the_kernel_on_its_rows_and_whole_gqa_groups(monkeypatch, backend, kernel, b, local_b):
    seen = []

    def one_device(q, k, v, segment_ids, causal, **_):
        seen.append((q.shape, k.shape, v.shape, segment_ids.shape))
        return attention(q, k, v, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)

    monkeypatch.setattr(attention_lib, kernel, one_device)
    q, k, v, seg = _packed_case(b, 40, 2, True)
    want = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    with jax.set_mesh(_mesh("fsdp2_tensor4")), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        got = jax.jit(lambda q, k, v, seg: attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                                     backend=backend))(q, k, v, seg)
    # 8 q heads over tensor 4: 2 per device, with the one kv head (of 2, repeated to 4) their group reads.
    assert seen == [((local_b, 40, 2, 16), (local_b, 40, 1, 16), (local_b, 40, 1, 16), (local_b, 40))]
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-6)


def test_the_real_splash_kernel_compiles_for_a_multi_chip_tpu_mesh():
    """Ahead of time from this CPU host: the Mosaic kernel (not its interpreter) inside the shard_map, forward and
    backward, at a length off the block grid and a head dim (80) off the 128 lanes."""
    devices = parallel.topology_devices("v5p:2x2x2")  # libtpu is a test requirement (requirements-plan.txt)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 2, 4), parallel.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def grads(q, k, v, seg):
        def loss(q, k, v):
            out = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, backend="splash")
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    shape = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        compiled = jax.jit(grads).lower(shape((8, 200, 8, 80)), shape((8, 200, 2, 80)), shape((8, 200, 2, 80)),
                                        jax.ShapeDtypeStruct((8, 200), jnp.int32)).compile()
    assert "tpu_custom_call" in compiled.as_text()


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
    config = load_config(f"{ROOT}/configs/demo_navit.py", TINY + ["model.attention=splash", "model.scan_layers=False"])
    jax.eval_shape(VLM(config.model).init, jax.random.PRNGKey(0), *dummy_inputs(config.model))
    vision, text = config.model.vision.depth, config.model.text.layers
    assert [c for _, c in calls].count(False) == vision and [c for _, c in calls].count(True) == text


def test_auto_backend_is_the_platforms_kernel():
    assert [attention_lib.resolve_backend("auto", p) for p in ("tpu", "gpu", "cpu", "rocm")] == [
        "splash", "cudnn", "xla", "xla"]
    assert attention_lib.resolve_backend("splash", "cpu") == "splash"  # a named kernel is never second-guessed
    q, k, v = _qkv()
    seg = jnp.asarray(SEGMENTS)
    np.testing.assert_array_equal(  # this host is a CPU: auto is the masked path
        attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, backend="auto"),
        attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg))


def _poisoned_cudnn(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type):
    """Stands in for the packed cuDNN kernel on CPU: the masked path on the segments that lengths and offsets
    describe, with what the real kernel leaves undefined (outputs and gradients of tokens outside every segment)
    made NaN; refuses lengths off its block grid as the real one refuses some."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    assert q.shape[1] % attention_lib.CUDNN_BLOCK == 0, q.shape
    pos = jnp.arange(q.shape[1])[None, :, None]
    inside = (pos >= q_offsets[:, None, :-1]) & (pos < q_offsets[:, None, :-1] + q_seqlen[:, None, :])
    seg = jnp.sum(jnp.where(inside, jnp.arange(1, q_seqlen.shape[1] + 1), 0), axis=-1)
    out = attention(q, k, v, causal=mask_type == cudnn.MaskType.PADDING_CAUSAL, q_segment_ids=seg,
                    kv_segment_ids=seg)
    return out + jnp.where(seg == 0, jnp.nan, 0)[:, :, None, None] * q


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_wrapper_pads_the_length_and_keeps_padding_out_of_the_gradients(monkeypatch, causal):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "dot_product_attention", _poisoned_cudnn)
    q, k, v, seg = _packed_case(4, 177, 2, True)  # 177: odd, off the kernel's block grid
    real, want, want_grads = _loss_and_grads("xla", q, k, v, seg, causal)
    _, got, got_grads = _loss_and_grads("cudnn", q, k, v, seg, causal)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, err_msg=f"d loss / d {name}")
