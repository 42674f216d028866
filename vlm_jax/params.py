"""The VLM's parameter tree as abstract shapes and shardings, addressed by `a/b/c` paths."""

import flax.linen as nn
import jax
import ml_collections
from flax import traverse_util
from jax.sharding import Mesh

from vlm_jax import image_inputs, parallel
from vlm_jax.checkpoints.errors import ConversionError
from vlm_jax.model import VLM


def _boxed(model: ml_collections.ConfigDict):
    if not model.scan_layers:
        raise ConversionError("conversion uses the scanned parameter layout; set model.scan_layers=True")
    # The trainer's init (train/loop.py Setup), traced: the same tree whatever the data settings.
    return jax.eval_shape(lambda: VLM(model).init(jax.random.key(0), *image_inputs.dummy_inputs(model)))["params"]


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def unflat(leaves: dict) -> dict:
    return traverse_util.unflatten_dict(leaves, sep="/")


def in_parts(path: str, parts: tuple[str, ...]) -> bool:
    return path.split("/", 1)[0] in parts


def abstract_params(model: ml_collections.ConfigDict, parts: tuple[str, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """path -> ShapeDtypeStruct for the leaves of the named subtrees (`vision`, `connector`, `decoder`)."""
    return {k: v for k, v in flat(nn.meta.unbox(_boxed(model))).items() if in_parts(k, parts)}


def param_shardings(model: ml_collections.ConfigDict, parts: tuple[str, ...], mesh: Mesh) -> dict:
    """path -> NamedSharding from the logical axis rules."""
    return {k: v for k, v in flat(parallel.logical_shardings(_boxed(model), mesh)).items() if in_parts(k, parts)}
