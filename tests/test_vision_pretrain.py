"""Stage 0 (vision pretraining on dense patch labels): the labels follow the scene geometry, the stage learns
on a sharded mesh, and the VLM stage starts from its tower, frozen, without rerunning it on resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax.checkpoints.params_only import restore_params
from vlm_jax.data import synthetic
from vlm_jax.data.images import tile_image
from vlm_jax.data.navit import navit_patches
from vlm_jax.demo.stages import train_demo
from vlm_jax.demo.vision_pretrain import CLASSES, IGNORE, NONE, DenseLabeler, LabelledBatches, pretrain_vision
from vlm_jax.train import loop
from tests.helpers import tiny_config

STAGE0 = ["vision_pretrain.steps=40", "vision_pretrain.batch_size=32", "vision_pretrain.eval_images=128",
          'optim.trainable=[("vision/.*", "frozen"), (".*", "train")]']


def test_quadrant_grid_labels_name_each_quadrants_shape():
    for i in range(50):
        scene = synthetic.sample_scene(0, "train", i, 32, 80)
        labels = synthetic.patch_labels(scene, 2, 2)
        by_quadrant = {s.quadrant: s for s in scene.shapes}
        np.testing.assert_array_equal(labels["quadrant"], np.arange(4))
        for q, name in enumerate(synthetic.QUADRANTS):
            s = by_quadrant.get(name)
            assert labels["shape"][q] == (synthetic.SHAPES.index(s.shape) if s else NONE["shape"])
            assert labels["color"][q] == (list(synthetic.COLORS).index(s.color) if s else NONE["color"])


def test_fine_grid_labels_a_shape_where_it_is_and_nothing_elsewhere():
    scene = synthetic.sample_scene(0, "train", 3, 64, 64)
    labels = synthetic.patch_labels(scene, 16, 16)["shape"].reshape(16, 16)
    for s in scene.shapes:
        assert labels[int(s.cy / 4), int(s.cx / 4)] == synthetic.SHAPES.index(s.shape)
    covered = np.zeros((16, 16), bool)
    for s in scene.shapes:
        ys, xs = np.mgrid[0:16, 0:16] * 4 + 2
        covered |= (abs(xs - s.cx) <= s.r + 2) & (abs(ys - s.cy) <= s.r + 2)
    assert np.all(labels[~covered] == NONE["shape"])


def test_a_tile_is_labelled_over_the_part_of_the_image_it_shows():
    # 64 px square images and 32 px tiles: a 2x2 grid, so tile k shows exactly quadrant k.
    config = tiny_config("data.min_image_size=64", "data.max_image_size=64", "vision_pretrain.tile_fraction=1.0")
    batches = LabelledBatches(config, "train", 1000)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        index = int(np.random.default_rng(seed).integers(1000))
        view = batches.view(rng)
        img, scene = batches.image(index)
        tiles = tile_image(img, 32, config.data.max_tiles, config.data.swap_hw)[1:]
        k = next(k for k, t in enumerate(tiles) if np.array_equal(t, view["pixels"]))
        inside = [s for s in scene.shapes if s.quadrant == synthetic.QUADRANTS[k]]
        shown = {synthetic.SHAPES.index(s.shape) for s in inside}
        assert shown <= set(view["labels_shape"]) <= shown | {NONE["shape"]}
        assert np.all(view["labels_quadrant"] == IGNORE)


def test_navit_rows_carry_one_label_per_merge_window():
    config = tiny_config()
    navit = tiny_config("model.vision.stem=navit", "model.vision.patch_size=8", "model.vision.drop_cls=False",
                        "model.connector.merge_size=2", "data.max_patches_per_row=144", "data.max_images_per_row=4")
    navit.model.vision.temporal_patch_size = 2
    batches = LabelledBatches(navit, "train", 100)
    row = batches.batch(0, 2)
    assert row["patches"].shape == (2, 144, 3 * 2 * 8 * 8)
    windows = row["patch_segment_ids"][:, ::4]
    np.testing.assert_array_equal(row["patch_segment_ids"], np.repeat(windows, 4, axis=1))
    for k in ("labels_shape", "labels_color", "labels_quadrant"):
        np.testing.assert_array_equal(row[k] == IGNORE, windows == 0)
    # The first image of row 0, labelled over its 16 px windows in raster order.
    rng = np.random.default_rng([navit.seed, synthetic.SPLITS["train"], 0, 0])
    img, scene = batches.image(int(rng.integers(len(batches.source))))
    h, w = navit_patches(img, patch_size=8, temporal_patch_size=2, merge_size=2, min_pixels=navit.data.min_pixels,
                         max_pixels=navit.data.max_pixels)[1][1:]
    expected = synthetic.patch_labels(scene, h // 2, w // 2)
    for k, v in expected.items():
        np.testing.assert_array_equal(row[f"labels_{k}"][0, :len(v)], v)
    assert np.any(row["labels_shape"] >= 0) and np.any(row["labels_shape"] == NONE["shape"])
    # The heads answer once per window too (the loss would otherwise score the last quarter of the patch tokens).
    model = DenseLabeler(navit.model)
    inputs = [jax.numpy.asarray(row[k]) for k in ("patches", "patch_positions", "patch_segment_ids")]
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *inputs)[0])
    assert {k: v.shape for k, v in logits.items()} == {k: (2, 36, n) for k, n in CLASSES.items()}
    tiled = LabelledBatches(config, "train", 100).batch(0, 4)
    assert tiled["pixels"].shape == (4, 32, 32, 3) and tiled["labels_shape"].shape == (4, 4)


def test_llava_json_data_has_no_labels_to_pretrain_on():
    with pytest.raises(ValueError, match="only the synthetic source"):
        LabelledBatches(tiny_config("data.source=llava_json"), "train", 10)


def test_stage0_learns_then_the_vlm_starts_from_its_frozen_tower(tmp_path):
    config = tiny_config(*STAGE0, "total_steps=1", "checkpoint_every=1")
    workdir = str(tmp_path / "run")
    state = train_demo(config, workdir)
    with open(os.path.join(workdir, "vision_pretrain", "eval.json")) as f:
        result = json.load(f)
    # Chance is 1/5 on shape and 1/8 on colour, over patches that hold a shape.
    assert result["color_accuracy"] > 0.6 and result["shape_accuracy"] > 0.3, result
    setup = loop.Setup(config)
    tower = restore_params(os.path.join(workdir, "vision_pretrain", "params"),
                           {"vision": setup.abstract_params["vision"]}, {"vision": setup.param_shardings["vision"]})
    trained = traverse_util.flatten_dict(jax.device_get(state.params["vision"]))
    for path, value in traverse_util.flatten_dict(jax.device_get(tower["vision"])).items():
        np.testing.assert_array_equal(trained[path], value, err_msg=str(path))

    # Stage 0 only ever runs once in a workdir: a run resumed before its first VLM checkpoint finds its tower.
    stamp = os.path.getmtime(os.path.join(workdir, "vision_pretrain", "eval.json"))
    assert pretrain_vision(config, os.path.join(workdir, "vision_pretrain")) == os.path.join(workdir, "vision_pretrain")
    assert os.path.getmtime(os.path.join(workdir, "vision_pretrain", "eval.json")) == stamp
    # Nor once the VLM stage has a checkpoint: the resumed run needs no tower, even a deleted one.
    shutil.rmtree(os.path.join(workdir, "vision_pretrain"))
    resumed = train_demo(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "vision_pretrain")) and int(resumed.step) == 1


def test_stage0_and_init_params_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="both set"):
        train_demo(tiny_config(*STAGE0, f"init_params={tmp_path}"), str(tmp_path / "run"))
