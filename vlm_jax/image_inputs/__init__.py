"""The image-input kind of a model, chosen once from its config: tiles (views of a static size through a tiled
ViT) or packed patches (NaViT). Everything that depends on the kind (batch keys, row layout, record -> example,
prompt padding, dummy inputs, the encoder call and scatter) is its method; the rest of the library passes
`images`, the dict of the kind's arrays, through. Each kind's data half lives in vlm_jax/data/image_kinds.py,
which data code uses without loading jax."""

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.data.image_kinds import kind_name
from vlm_jax.image_inputs.base import ImageInputs
from vlm_jax.image_inputs.patches import Patches
from vlm_jax.image_inputs.tiles import Tiles

KINDS: dict[str, type[ImageInputs]] = {k.name: k for k in (Tiles, Patches)}


def create(name: str, model: ml_collections.ConfigDict) -> ImageInputs:
    """The image-input kind `name` for `model` (config.model)."""
    if name not in KINDS:
        raise ValueError(f"unknown image-input kind {name!r}; choose from {sorted(KINDS)}")
    return KINDS[name](model)


def make(model: ml_collections.ConfigDict) -> ImageInputs:
    """The image-input kind of `model` (config.model), as its vision stem takes images."""
    return create(kind_name(model), model)


def dummy_inputs(model: ml_collections.ConfigDict, length: int = 8) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """(tokens, positions, segment_ids, images) of one tiny row of `model`: what init traces the VLM with.
    No parameter depends on the batch's rows or lengths, so the trainer and interop build the same tree."""
    kind = make(model)
    positions = jnp.zeros((1, length, 3) if kind.mrope() else (1, length), jnp.int32)
    return jnp.zeros((1, length), jnp.int32), positions, jnp.ones((1, length), jnp.int32), kind.dummy(length)
