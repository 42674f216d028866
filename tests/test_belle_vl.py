"""Belle-VL: real sizes from jax.eval_shape (the torch counts of the reference module and of Qwen-14B), its
stage groups, and 256 placeholder slots per image at both resolutions. Its tiny stage recipes run in
tests/test_stage_configs.py."""

import math
import os

import jax
import ml_collections

from tests.helpers import ROOT
from vlm_jax import parallel
from vlm_jax.config import load_config
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.params import abstract_params, param_shardings
from vlm_jax.train import loop

# PyTorch counts: tests/qwen_vl_reference.py at Belle-VL's sizes (tower; attn_pool + ln_post + proj, the
# fixed 256 x 5120 sin-cos table included) and Qwen-14B (docs/architectures.md 4.3, about 14.2 B).
TOWER, RESAMPLER, SINCOS, QWEN_14B = 1_842_770_688, 142_264_320, 256 * 5120, 14_167_290_880


def belle(arg: str):
    return load_config(os.path.join(ROOT, "configs", f"belle_vl.py:{arg}"))


def test_real_sizes_and_groups():
    model = belle("stage2").model
    count = {part: sum(math.prod(v.shape) for v in abstract_params(model, (part,)).values())
             for part in ("vision", "connector", "decoder")}
    assert count == dict(vision=TOWER, connector=RESAMPLER, decoder=QWEN_14B)
    for stage, trained in (("stage1", {"resampler"}), ("stage2", {"resampler", "llm"})):
        groups = {r["group"]: r["params"] for r in loop.Setup(belle(stage), jax.devices()[:1]).groups.table()}
        assert set(groups) == trained | {"frozen"}
        assert groups["resampler"] == RESAMPLER - SINCOS
    assert groups["llm"] == QWEN_14B


def test_256_slots_per_image_at_224_and_448():
    for stage, size in (("stage1", 224), ("stage2", 448)):
        config = belle(stage)
        assert (config.data.tile_size, config.model.vision.image_size) == (size, size)
        assert tokens_per_tile(config.model, config.data.tile_size) == 256


def test_real_size_tower_and_resampler_shard_over_the_mesh():
    """On a 4 (fsdp) x 2 (tensor) mesh every kernel of the ViT blocks and the resampler is split 8 ways."""
    model = belle("stage2").model
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    shapes = {k: v.shape for k, v in abstract_params(model, ("vision", "connector")).items()}
    shardings = param_shardings(model, ("vision", "connector"), mesh)
    kernels = [k for k in shapes if k.endswith("kernel") and "/stem/" not in k]
    assert len(kernels) == 6 + 6  # ViT q/k/v/o, fc1, fc2; resampler q/k/v/o, kv_proj, proj
    for path in kernels:
        assert math.prod(shardings[path].shard_shape(shapes[path])) * 8 == math.prod(shapes[path]), path
