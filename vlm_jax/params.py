"""The VLM's parameter tree as abstract shapes and shardings, addressed by `a/b/c` paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.checkpoints.errors import ConversionError
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.model import VLM


def _boxed(model: ml_collections.ConfigDict):
    if not model.scan_layers:
        raise ConversionError("conversion uses the scanned parameter layout; set model.scan_layers=True")
    if model.vision.stem == "navit":
        # A NaViT tower takes packed patches (data/navit.py), not tiles: one merge window of them.
        v, n = model.vision, model.connector.get("merge_size", 1) ** 2
        mrope = model.text.get("rope_kind", "1d") == "mrope"  # Qwen2-VL: positions [B, L, 3]
        text = (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8, 3) if mrope else (1, 8), jnp.int32),
                jnp.ones((1, 8), jnp.int32))
        patches = (jnp.zeros((1, n, 3 * v.temporal_patch_size * v.patch_size ** 2)), jnp.zeros((1, n, 2), jnp.int32),
                   jnp.ones((1, n), jnp.int32))
        return jax.eval_shape(lambda: VLM(model).init(
            jax.random.key(0), method=lambda m: (m.decoder(*text), m.encode_patches(*patches))))["params"]
    size = model.vision.image_size
    inputs = (jnp.zeros((1, 8), jnp.int32),) * 3 + (
        jnp.zeros((1, 1, size, size, 3)), jnp.ones((1, 1), bool),
        jnp.zeros((1, tokens_per_tile(model, size)), jnp.int32))
    return jax.eval_shape(lambda: VLM(model).init(jax.random.key(0), *inputs))["params"]


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
