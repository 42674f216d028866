"""Tiles, model half: every view through the tower alone, its P visual tokens written at its placeholder run
(docs/contracts.md)."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.image_kinds import TileData
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.image_inputs.base import ImageInputs, scatter


def windows_first(features: jax.Array, merge: int) -> jax.Array:
    """[n, g*g, D] tokens of square patch grids in row-major order -> the same tokens with each merge x merge
    window contiguous (windows row-major, raster inside), the order the connector's merge concatenates: a
    tile's features then merge like NaViT's (InternVL's pixel shuffle groups tile tokens the same way)."""
    n, tokens, d = features.shape
    g = round(tokens ** 0.5)
    if g * g != tokens or g % merge:
        raise ValueError(f"{tokens} tokens per tile are not a square grid of whole {merge}x{merge} windows "
                         "(merge_size on tiles needs vision.drop_cls and tile_size / patch_size divisible by it)")
    x = features.reshape(n, g // merge, merge, g // merge, merge, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, tokens, d)


class Tiles(TileData, ImageInputs):
    def dummy(self, length: int) -> dict[str, jax.Array]:
        size = self.model.vision.image_size
        return dict(tiles=jnp.zeros((1, 1, size, size, 3)), tile_mask=jnp.ones((1, 1), bool),
                    image_dest=jnp.full((1, tokens_per_tile(self.model, size)), length, jnp.int32))

    def encode(self, vlm, images: dict[str, jax.Array]) -> jax.Array:
        """tiles [B, T, S, S, 3] -> visual tokens [B, T*P, hidden], tile-major."""
        tiles = images["tiles"]
        b, t = tiles.shape[:2]
        features = vlm.vision(tiles.reshape(b * t, *tiles.shape[2:]))
        merge = self.model.connector.merge_size
        if merge > 1:
            features = windows_first(features, merge)
        visual = vlm.connector(features)
        return visual.reshape(b, t * visual.shape[1], visual.shape[2])

    def embed(self, vlm, x: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """Every real tile's visual tokens written at its `image_dest` positions."""
        tile_mask, image_dest = images["tile_mask"], images["image_dest"]
        visual = self.encode(vlm, images).astype(x.dtype)
        per_tile = visual.shape[1] // tile_mask.shape[1]
        if image_dest.shape[1] != visual.shape[1]:
            raise ValueError(f"image_dest has {image_dest.shape[1]} slots for {visual.shape[1]} visual tokens "
                             f"({per_tile} per tile): reserve data.packing.tokens_per_tile placeholders per tile")
        return scatter(x, visual, jnp.repeat(tile_mask, per_tile, axis=1), image_dest)

    def one_image_per_row(self, images: list, image_dest: np.ndarray) -> dict[str, jax.Array]:
        views = jnp.asarray(np.stack(images))[:, None]
        return dict(tiles=views, tile_mask=jnp.ones(views.shape[:2], bool), image_dest=jnp.asarray(image_dest))
