"""Every system's stage recipes, tiny: frozen parameters (and frozen layers of a partly unfrozen stack) stay
bit-identical over several steps, every trainable parameter moves, Adam state exists only for the
trainable groups, and a stage-2 run starts from the stage-1 run's parameters."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax.config import load_config
from vlm_jax.data.image_kinds import tile_processor
from vlm_jax.data.image_processor import ImageProcessor, from_hf
from vlm_jax import parallel
from vlm_jax.train import loop
from vlm_jax.train.optim import optimizer_state_bytes
from vlm_jax.train.step import make_train_step
from tests.helpers import ROOT, first_batch

ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "batch_size=2"]


def stage_config(system: str, stage: str, *extra: str):
    return load_config(os.path.join(ROOT, "configs", f"{system}.py:{stage},tiny"), ONE_DEVICE + list(extra))


def _trains(setup, path: tuple, layer: int | None) -> bool:
    mask = setup.groups.layer_masks.get(path)
    return setup.groups.trains(path) and (mask is None or bool(mask[layer]))


@pytest.mark.parametrize("system,stage", [(s, t) for s in ("sharegpt4v_7b", "xverse_v_13b", "points15_7b",
                                                           "ziya_blip2_14b", "belle_vl", "demo_recipe")
                                          for t in ("stage1", "stage2")])
def test_stage_recipe_freezes_and_trains_exactly_its_groups(system, stage):
    config = stage_config(system, stage)
    setup = loop.Setup(config, jax.devices()[:1])
    state = setup.fresh_state()
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
    batch = parallel.global_batch(first_batch(config), setup.mesh)
    for _ in range(3):  # warmup: step 1 runs at lr 0; LoRA's A only gets gradients once B has moved
        state, _ = step(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    for path, old in before.items():
        layers = range(old.shape[0]) if path in setup.groups.layer_masks else [None]
        for i in layers:
            a, b = (old, after[path]) if i is None else (old[i], after[path][i])
            if _trains(setup, path, i):
                assert np.any(a != b), (path, i)
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{path} layer {i}")
    trainable = jax.tree.leaves(state.trainable)
    groups = sum(not s.frozen for s in setup.groups.specs.values())
    assert optimizer_state_bytes(state.opt_state) == 2 * optimizer_state_bytes(trainable) + groups * 2 * 4
    assert {r["group"] for r in setup.groups.table()} >= {"frozen"}


def test_stage2_starts_from_the_stage1_run(tmp_path):
    stage1 = stage_config("sharegpt4v_7b", "stage1", "total_steps=2", "checkpoint_every=2", "mesh.data=-1",
                          "batch_size=8")
    final = loop.train(stage1, str(tmp_path / "stage1"))
    # The run records its image processor, where a run starting from it finds it (data.image_processor="auto").
    recorded = json.loads((tmp_path / "stage1" / "preprocessor_config.json").read_text())
    assert from_hf(recorded) == tile_processor(stage1)
    table = json.loads((tmp_path / "stage1" / "param_groups.json").read_text())
    assert [r["group"] for r in table] == ["frozen", "train", "vision_top"]
    stage2 = stage_config("sharegpt4v_7b", "stage2", f"init_params={tmp_path / 'stage1'}")
    started = loop.Setup(stage2, jax.devices()[:1]).imported_state(stage2.init_params)
    for a, b in zip(jax.tree.leaves(jax.device_get(final.params)),
                    jax.tree.leaves(jax.device_get(started.params))):
        np.testing.assert_array_equal(a, b)
    assert int(started.step) == 0


def test_recipe_stage1_loads_all_but_the_fresh_projector(tmp_path):
    # Another seed, so the base model's parameters differ from stage 1's own fresh init everywhere.
    base = stage_config("demo_recipe", "stage1", "total_steps=1", "checkpoint_every=1", "seed=1", "mesh.data=-1",
                        "batch_size=8")
    trained = loop.train(base, str(tmp_path / "demo"))
    stage1 = stage_config("demo_recipe", "stage1", f"init_params={tmp_path / 'demo'}")
    setup = loop.Setup(stage1, jax.devices()[:1])
    started = traverse_util.flatten_dict(jax.device_get(setup.imported_state(stage1.init_params).params))
    fresh = traverse_util.flatten_dict(jax.device_get(setup.fresh_state().params))
    for path, value in traverse_util.flatten_dict(jax.device_get(trained.params)).items():
        want = fresh[path] if path[0] == "connector" else value
        np.testing.assert_array_equal(started[path], want, err_msg=str(path))
        assert path[0] == "connector" or np.any(value != fresh[path]) or np.ptp(value) == 0, path  # constant inits
    wrong = stage_config("demo_recipe", "stage1", f"init_params={tmp_path / 'demo'}", "init_fresh=projector/.*")
    with pytest.raises(ValueError, match="init_fresh='projector/.\\*' matches no parameter"):
        loop.Setup(wrong, jax.devices()[:1]).imported_state(wrong.init_params)


def test_stage_argument_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"stage3.*\['stage1', 'stage2'\]"):
        load_config(os.path.join(ROOT, "configs/sharegpt4v_7b.py:stage3"))


def test_real_size_group_table():
    """eval_shape only: XVERSE-V stage 2's LoRA is the 500,695,040 parameters of docs/architectures.md 1.4, and
    ShareGPT4V stage 1 trains ViT blocks 12-22 (block 23 feeds no feature at layer -2)."""
    def table(arg: str) -> dict:
        setup = loop.Setup(load_config(os.path.join(ROOT, "configs", arg)), jax.devices()[:1])
        return {r["group"]: r for r in setup.groups.table()}

    xverse = table("xverse_v_13b.py:stage2")
    assert xverse["lora"]["params"] == 500_695_040 and xverse["lora"]["lr"] == 2e-4
    assert xverse["connector"]["params"] == 31_467_520  # llama_proj; ln_vision stays frozen
    assert table("sharegpt4v_7b.py:stage1")["vision_top"]["params"] == 11 * 12_596_224


@pytest.mark.parametrize("arg,processor", [
    # CLIP-336's processor; stage 2 pads to a square first (image_aspect_ratio pad), stage 1 does not.
    ("sharegpt4v_7b.py:stage1", ImageProcessor(resize="shortest_edge", size=(336,), crop=(336, 336))),
    ("sharegpt4v_13b.py:stage2", ImageProcessor(resize="shortest_edge", size=(336,), crop=(336, 336),
                                                pad_square=True)),
    ("ziya_blip2_14b.py:stage1", ImageProcessor(size=(224, 224))),  # BlipImageProcessor at 224
    ("belle_vl.py:stage2", ImageProcessor(size=(448, 448))),  # Qwen-VL's Resize((448, 448), BICUBIC)
    ("xverse_v_13b.py:stage1", ImageProcessor(size=(224, 224))),  # hd_image_train's global view
])
def test_stage_configs_preprocess_as_released(arg, processor, tmp_path):
    # An import holding another processor file does not change the release's preprocessing.
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BlipImageProcessor", "size": 1000}))
    config = load_config(os.path.join(ROOT, "configs", arg), [f"init_params={tmp_path}"])
    assert tile_processor(config) == processor
