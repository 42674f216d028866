"""NaViT (Qwen2-VL vision tower as POINTS1.5 uses it): preprocessing equals transformers' processor bit for bit,
the packed tower + PatchMerger equal transformers' Qwen2-VL vision model on several images of different
sizes, packed into padded rows, and the decoder's M-RoPE ids equal HF's get_rope_index."""

import io
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Qwen2VLVisionConfig
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_processing
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from configs.base import get_config
from tests.helpers import randomize_torch
from vlm_jax import parallel
from vlm_jax.data.navit import mrope_positions, navit_patches, pack_patches, patch_positions, smart_resize
from vlm_jax.interop.hf_import import Source, import_params, model_config
from vlm_jax.layers import rope
from vlm_jax.model import VLM
from vlm_jax.params import unflat

SIZES = [(10, 13), (27, 29), (56, 56), (100, 37), (37, 100), (333, 251), (640, 480), (1000, 60), (5, 700),
         (224, 224), (57, 85), (29, 1000)]


def _photo(width: int, height: int, seed: int, fmt: str) -> Image.Image:
    """A gradient-plus-noise image round-tripped through an image file, as a loader would read it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-40, 40, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("min_pixels,max_pixels", [(56 * 56, 28 * 28 * 64), (28 * 28 * 16, 28 * 28 * 1280)])
def test_pixels_equal_hf_processor(min_pixels, max_pixels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    for i, (w, h) in enumerate(SIZES):
        img = _photo(w, h, i, "JPEG" if i % 2 else "PNG")
        want = proc(images=[img], return_tensors="np")
        patches, grid = navit_patches(img, min_pixels=min_pixels, max_pixels=max_pixels)
        assert grid == tuple(want["image_grid_thw"][0]), (w, h)
        assert patches.dtype == np.float32
        np.testing.assert_array_equal(patches, want["pixel_values"], err_msg=f"{w}x{h}")


def test_smart_resize_equals_hf():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 200)) * 28 * 28
        hi = lo + int(rng.integers(0, 2000)) * 28 * 28
        assert smart_resize(h, w, 28, lo, hi) == hf_processing.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_patch_positions_raster_over_windows():
    # A 4x6 grid: windows of 2x2 in raster order, raster inside each window.
    pos = patch_positions((1, 4, 6))
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert sorted(map(tuple, pos.tolist())) == [(r, c) for r in range(4) for c in range(6)]


def test_pack_patches_layout_and_limits():
    a, b = (np.ones((8, 1176), np.float32), (1, 2, 4)), (np.full((4, 1176), 2, np.float32), (1, 2, 2))
    row = pack_patches([a, b], 16)
    assert row["patch_segment_ids"].tolist() == [1] * 8 + [2] * 4 + [0] * 4
    assert (row["patches"][12:] == 0).all() and (row["patches"][8:12] == 2).all()
    assert row["patch_positions"][8:12].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="more than max_patches"):
        pack_patches([a, b], 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_patches([a], 10)


def tiny_tower(tmp_path) -> str:
    """A tiny random Qwen2-VL vision tower saved as transformers writes it; its directory."""
    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=48, num_heads=4, mlp_ratio=2)
    tower = Qwen2VisionTransformerPretrainedModel(config).eval()
    randomize_torch(tower, seed=3)
    path = str(tmp_path / "tower")
    tower.save_pretrained(path)
    return path


def test_packed_tower_and_merger_match_torch(tmp_path):
    path = tiny_tower(tmp_path)
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(path, dtype=torch.float32).eval()
    source = Source(path)
    assert source.family == "qwen2_vl_vision"
    model = model_config([source], get_config().model, "float32")
    params = unflat(import_params([source], model, parallel.make_mesh(get_config().mesh)))

    # Three real images of different sizes; rows of 64 patch slots: [A, B, padding] and [C, padding].
    images = [navit_patches(_photo(w, h, i, "PNG"), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)
              for i, (w, h) in enumerate([(70, 110), (40, 40), (120, 60)])]
    assert len({g for _, g in images}) == 3
    rows = [pack_patches(images[:2], 64), pack_patches(images[2:], 64)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    args = (batch["patches"], batch["patch_positions"], batch["patch_segment_ids"])
    vlm = VLM(model)
    feats = jax.jit(lambda p, *a: vlm.apply({"params": p}, *a, method=lambda m, *x: m.vision(*x)))(params, *args)
    tokens = jax.jit(lambda p, b: vlm.apply({"params": p}, b, method=VLM.encode_images))(params, batch)
    assert tokens.shape == (2, 16, 48)

    with torch.no_grad():
        want = tower(hidden_states=torch.from_numpy(np.concatenate([p for p, _ in images])),
                     grid_thw=torch.tensor([g for _, g in images]))
    want_feats, want_tokens = want.last_hidden_state.numpy(), want.pooler_output.numpy()
    n = [math.prod(g) for _, g in images]
    got_feats = np.concatenate([feats[0, :n[0] + n[1]], feats[1, :n[2]]])
    got_tokens = np.concatenate([tokens[0, :(n[0] + n[1]) // 4], tokens[1, :n[2] // 4]])
    assert np.abs(want_feats).max() > 1.0  # randomized weights: a real comparison, not near-zero outputs
    np.testing.assert_allclose(got_feats, want_feats, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_tokens, want_tokens, atol=1e-5, rtol=0)
    # Padding never leaks into real patches: the same image alone in a row gives the same features (up to
    # summation order over the longer row).
    alone = pack_patches(images[2:], n[2])
    solo = jax.jit(lambda p, *a: vlm.apply({"params": p}, *a, method=lambda m, *x: m.vision(*x)))(
        params, *(jnp.asarray(alone[k][None]) for k in ("patches", "patch_positions", "patch_segment_ids")))
    np.testing.assert_allclose(solo[0], feats[1, :n[2]], atol=1e-5, rtol=0)


def test_mrope_positions_equal_hf_get_rope_index():
    """Two images of different grids between text runs, as HF computes M-RoPE ids from mm_token_type_ids."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2),
                           text_config=dict(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
                                            bos_token_id=0, rope_parameters=dict(rope_type="default",
                                                                                 mrope_section=[2, 3, 3])))
    pieces = [3, (1, 4, 6), 2, (1, 8, 2), 5]
    types = np.concatenate([np.zeros(p, np.int64) if isinstance(p, int) else np.ones(math.prod(p) // 4, np.int64)
                            for p in pieces])
    want, _ = Qwen2VLModel(config).get_rope_index(
        torch.zeros((1, len(types)), dtype=torch.long), torch.from_numpy(types)[None],
        image_grid_thw=torch.tensor([p for p in pieces if not isinstance(p, int)]))
    np.testing.assert_array_equal(mrope_positions(pieces), want[:, 0].numpy().T)


def test_mrope_on_text_equals_1d_rope():
    positions = jnp.arange(12)[None] + 5
    one_d = rope.rope_cos_sin(positions, 16, 1e4)
    m = rope.mrope_cos_sin(jnp.repeat(positions[..., None], 3, axis=-1), 16, 1e4, (2, 3, 3))
    for a, b in zip(one_d, m):
        np.testing.assert_array_equal(a, b)
