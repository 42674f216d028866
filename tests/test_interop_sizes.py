"""Real sizes without memory: parameter counts from jax.eval_shape equal the PyTorch models' counts."""

import math

import pytest

from configs.sizes import get_config
from vlm_jax.params import abstract_params



def _count(name: str, part: str, **vision) -> int:
    model = get_config(name).model
    model.vision.update(vision)
    return sum(math.prod(v.shape) for v in abstract_params(model, (part,)).values())


# PyTorch counts: CLIP (docs/architectures.md 1.2 / 5.2, incl. the last block and post_layernorm that our ViT
# does not build: one block = 12,596,224, post_layernorm = 2,048); projectors (5.2); LLMs as published
# (Vicuna-7B 6,738,415,616, Qwen2.5-7B 7,615,616,512) or from the 7.3 shapes.
CLIP_BLOCK, POST_LN = 12_596_224, 2_048


@pytest.mark.parametrize("name,torch_count", [("xverse_v_13b", 303_179_776), ("sharegpt4v_7b", 303_507_456)])
def test_clip_towers(name, torch_count):
    assert _count(name, "vision") + CLIP_BLOCK + POST_LN == torch_count
    assert _count(name, "vision", feature_layer=-1) + POST_LN == torch_count


@pytest.mark.parametrize("name,torch_count", [
    ("sharegpt4v_7b", 20_979_712), ("sharegpt4v_13b", 31_467_520), ("xverse_v_13b", 31_467_520 + 2_048)])
def test_projectors(name, torch_count):
    assert _count(name, "connector") == torch_count


@pytest.mark.parametrize("name,torch_count", [
    ("text:vicuna_7b", 6_738_415_616), ("text:vicuna_13b", 13_015_864_320), ("text:xverse_13b", 13_717_652_480),
    ("text:ziya_llama_13b", 13_091_886_080), ("text:qwen2_5_7b", 7_615_616_512)])
def test_llms(name, torch_count):
    assert _count(name, "decoder") == torch_count


def test_points15_navit_tower_and_patch_merger():
    """POINTS1.5's Qwen2-VL tower without its merger (docs/architectures.md 2.2: patch embed 1176 x 1280 + 32 blocks of
    19,677,440) and its vision_projector PatchMerger (2.3)."""
    assert _count("points15_7b", "vision") == 1176 * 1280 + 32 * 19_677_440 == 631_183_360
    assert _count("points15_7b", "connector") == 44_575_744
