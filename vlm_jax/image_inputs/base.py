"""The model half every image-input kind adds to its data half (vlm_jax/data/image_kinds.py): dummy inputs for
init, the encoder call and the scatter of visual tokens into the text embeddings."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.image_kinds import DataKind


def scatter(x: jax.Array, visual: jax.Array, valid: jax.Array, image_dest: jax.Array) -> jax.Array:
    """x [B, L, E] with visual [B, V, E] written at image_dest [B, V] where valid [B, V]. Invalid slots go out of
    range and are dropped, so padding cannot touch the text whatever image_dest holds for it."""
    dest = jnp.where(valid, image_dest, x.shape[1])
    return x.at[jnp.arange(x.shape[0])[:, None], dest].set(visual, mode="drop")


class ImageInputs(DataKind):
    """One image-input kind, data and model halves; subclasses fill in every method. The library hands its
    arrays around as `images`, a dict of `keys`, without looking inside."""

    def dummy(self, length: int) -> dict[str, jax.Array]:
        """The smallest images of one row for `length` text tokens: init traces the encoder with them (no
        parameter depends on the batch's rows or lengths)."""
        raise NotImplementedError

    def encode(self, vlm, images: dict[str, jax.Array]) -> jax.Array:
        """Visual tokens [B, V, hidden] of `images` through `vlm`'s vision tower and connector."""
        raise NotImplementedError

    def embed(self, vlm, x: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """Text embeddings x [B, L, hidden] with the visual tokens of `images` written where they belong."""
        raise NotImplementedError

    def one_image_per_row(self, images: list, image_dest: np.ndarray) -> dict[str, jax.Array]:
        """The `images` dict of rows holding one image each (a view [S, S, 3] or (patches, grid) per the kind),
        their visual tokens going to image_dest [B, V]: what a reference model takes one prompt at a time."""
        raise NotImplementedError
