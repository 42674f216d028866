"""The image-input kind: one factory picks it from the config and refuses what it does not know; its tiny
dummy inputs build the same parameter tree (shapes, dtypes, logical axes) as a real batch of the config."""

import flax.linen as nn
import jax
import pytest
from flax import traverse_util

from tests.helpers import tiny_config
from tests.test_packing import navit_config, navit_mrope_config
from vlm_jax import image_inputs
from vlm_jax.data.pipeline import row_layout
from vlm_jax.model import VLM


def test_factory_refuses_an_unknown_kind_in_one_line():
    model = tiny_config().model
    with pytest.raises(ValueError, match=r"^unknown image-input kind 'voxels'; choose from \['patches', 'tiles'\]$"):
        image_inputs.create("voxels", model)
    model.vision.stem = "voxel"
    with pytest.raises(ValueError, match=r"^model.vision.stem 'voxel' has no image-input kind; choose from "):
        image_inputs.make(model)


@pytest.mark.parametrize("make_config", [tiny_config, navit_config, navit_mrope_config],
                         ids=["tiles", "patches", "patches-mrope"])
def test_dummy_inputs_build_the_tree_of_a_real_batch(make_config):
    config = make_config()
    kind = image_inputs.make(config.model)
    assert kind.name == ("tiles" if make_config is tiny_config else "patches")
    batch = row_layout(config, grouped=False).empty(2)
    assert set(kind.keys) <= set(batch)
    real = (batch["tokens"], batch["positions"], batch["segment_ids"], kind.select(batch))
    model = VLM(config.model)

    def shapes(*inputs):
        params = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
        flat = traverse_util.flatten_dict(params, is_leaf=lambda _, v: isinstance(v, nn.LogicallyPartitioned))
        return {k: (v.value.shape, v.value.dtype, v.names) for k, v in flat.items()}

    assert shapes(*image_inputs.dummy_inputs(config.model)) == shapes(*real)


def test_select_names_the_missing_keys():
    kind = image_inputs.make(navit_config().model)
    with pytest.raises(ValueError, match=r"batch has no \['patch_positions', 'patch_segment_ids'\] for patches"):
        kind.select({"tokens": 0, "patches": 0, "image_dest": 0})
