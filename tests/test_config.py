"""The config schema (configs/base.py): every config carries all of it, and configs saved by older versions are
upgraded to it by one function (vlm_jax/config.py upgrade_config)."""

import json
import os

import jax.numpy as jnp
import pytest

from configs import base, sizes
from vlm_jax.config import load_config, to_json, upgrade_config, upgrade_model_config
from vlm_jax.layers.lora import LoraSpec
from vlm_jax.layers.options import ModuleOptions
from tests.helpers import ROOT

STAGED = ("belle_vl", "demo_recipe", "points15_7b", "sharegpt4v_7b", "sharegpt4v_13b", "xverse_v_13b",
          "ziya_blip2_14b")
CONFIGS = ([f"configs/{name}.py" for name in ("base", "demo", "demo_navit")]
           + [f"configs/{name}.py:{stage}" for name in STAGED for stage in ("stage1", "stage2", "stage2,tiny")]
           + [f"configs/sizes.py:{name}" for name in sorted(sizes.SYSTEMS)] + ["configs/sizes.py:text:qwen2_5_7b"])


def schema_keys(config) -> set[str]:
    """Dotted keys of `config`, the free-form optim.groups as one key."""
    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items") and prefix + key != "optim.groups":
                yield from walk(value, prefix + key + ".")
            else:
                yield prefix + key
    return set(walk(config, ""))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_has_exactly_the_schema(path):
    config = load_config(os.path.join(ROOT, path))
    assert schema_keys(config) == schema_keys(base.get_config())


def test_kind_specific_keys_are_overridable_everywhere():
    config = load_config(os.path.join(ROOT, "configs/demo.py"),
                         ["model.text.rope_kind=mrope", "model.text.mrope_sections=(4, 6, 6)",
                          "model.vision.pos_grid=4", "model.connector.num_queries=8", "data.vision_group_rows=2",
                          "init_fresh=connector/.*"])
    assert (config.model.text.rope_kind, tuple(config.model.text.mrope_sections)) == ("mrope", (4, 6, 6))
    assert (config.model.vision.pos_grid, config.model.connector.num_queries) == (4, 8)
    assert (config.data.vision_group_rows, config.init_fresh) == (2, "connector/.*")


def test_merge_size_lives_in_the_connector_alone():
    config = load_config(os.path.join(ROOT, "configs/points15_7b.py:stage1"))
    assert config.model.connector.merge_size == 2 and "spatial_merge_size" not in config.model.vision


# The shape of the first saved configs (configs/base.py before parameter groups, LoRA, NaViT, stage 0, attention
# kernels, frozen storage dtype, the chunked loss ...), as a workdir's config.json stored it, plus the
# vision.spatial_merge_size a NaViT model once also carried.
OLD = {
    "seed": 3, "total_steps": 50, "batch_size": 8, "log_every": 10, "checkpoint_every": 500, "keep_checkpoints": 2,
    "eval_batch_size": 32, "eval_examples": 256, "max_new_tokens": 8,
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "model": {
        "dtype": "float32", "param_dtype": "float32", "scan_layers": True, "remat_policy": "none",
        "vision": {"stem": "navit", "image_size": 224, "patch_size": 14, "width": 64, "depth": 2, "heads": 4,
                   "mlp_dim": 128, "mlp_act": "quick_gelu", "norm_eps": 1e-6, "pre_norm": False,
                   "feature_layer": -1, "drop_cls": False, "temporal_patch_size": 2, "spatial_merge_size": 2,
                   "rope_base": 10000.0},
        "connector": {"kind": "mlp", "in_norm": True, "norm_eps": 1e-6, "merge_size": 2, "hidden_dim": 256},
        "text": {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
                 "ffn": 128, "rms_eps": 1e-5, "rope_base": 10000.0, "qkv_bias": False, "tie_embeddings": False}},
    "data": {"source": "synthetic", "path": "", "tokenizer": "", "template": "vicuna_v1", "system": "",
             "seq_len": 128, "tile_size": 224, "max_tiles": 9, "swap_hw": True, "max_tiles_per_row": 20,
             "num_train": 100000, "num_eval": 512, "min_image_size": 64, "max_image_size": 448},
    "optim": {"lr": 1e-3, "warmup_steps": 10, "final_lr_ratio": 0.0, "weight_decay": 0.0, "b1": 0.9,
              "b2": 0.999, "clip_norm": 1.0, "trainable": [["vision/.*", "frozen"], [".*", "train"]]},
}


def test_an_old_saved_config_upgrades_to_what_it_computed():
    config = upgrade_config(json.loads(json.dumps(OLD)))
    assert schema_keys(config) == schema_keys(base.get_config())
    m = config.model
    # Keys added since, with the behaviour of the code that saved it.
    assert (m.loss_chunk_tokens, m.attention, m.frozen_param_dtype, m.max_segments) == (256, "xla", "", 64)
    assert (m.text.rope_kind, tuple(m.text.mrope_sections), m.lora.rank) == ("1d", (), 0)
    assert (config.data.vision_group_rows, config.data.shards, config.vision_pretrain.steps) == (1, 1, 0)
    assert (config.init_fresh, config.init_params, config.optim.groups.to_dict()) == ("", "", {})
    # The duplicate of the merge size is gone; the saved values are kept.
    assert "spatial_merge_size" not in m.vision and m.connector.merge_size == 2
    assert (config.seed, m.vision.width, m.connector.hidden_dim, config.optim.lr) == (3, 64, 256, 1e-3)
    assert [tuple(r) for r in config.optim.trainable] == [("vision/.*", "frozen"), (".*", "train")]


def test_an_old_model_section_upgrades_alone():
    model = upgrade_model_config(json.loads(json.dumps(OLD["model"])))
    assert (model.loss_chunk_tokens, model.attention, model.text.rope_kind) == (256, "xla", "1d")
    assert model.connector.merge_size == 2 and "spatial_merge_size" not in model.vision
    assert schema_keys(model) == schema_keys(base.get_config().model)


@pytest.mark.parametrize("path", ["configs/demo_recipe.py:stage2", "configs/points15_7b.py:stage2,tiny"])
def test_a_current_saved_config_upgrades_to_itself(path):
    config = load_config(os.path.join(ROOT, path))
    assert to_json(upgrade_config(json.loads(to_json(config)))) == to_json(config)


def test_an_unknown_saved_key_is_an_error_naming_it():
    saved = json.loads(json.dumps(OLD))
    saved["model"]["text"]["rope_scaling"] = 2.0
    with pytest.raises(ValueError, match=r"saved config key 'model.text.rope_scaling' is not in the schema"):
        upgrade_config(saved)
    saved = json.loads(json.dumps(OLD))
    saved["model"]["text"]["layers"] = "two"
    with pytest.raises(ValueError, match=r"saved config key 'model.text.layers'"):
        upgrade_config(saved)


def test_module_options_come_from_the_model_config_once():
    config = load_config(os.path.join(ROOT, "configs/demo.py"),
                         ["model.dtype=bfloat16", "model.remat_policy=full", "model.scan_layers=False",
                          "model.attention=cudnn", "model.max_segments=16", "model.lora.rank=4"])
    options = ModuleOptions.from_config(config.model)
    assert options == ModuleOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                    lora=LoraSpec(4, 16.0, 0.0, config.model.lora.targets), scan_layers=False,
                                    remat_policy="full", attention="cudnn", max_segments=16)
