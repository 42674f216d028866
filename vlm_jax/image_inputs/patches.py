"""Packed patches (NaViT: Qwen2-VL's tower, POINTS1.5), model half: the tower over each row's packed patches,
one visual token per merge window written at its placeholder (docs/contracts.md)."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.image_kinds import PatchData, patch_dim
from vlm_jax.data.navit import pack_patches
from vlm_jax.image_inputs.base import ImageInputs, scatter


class Patches(PatchData, ImageInputs):
    def dummy(self, length: int) -> dict[str, jax.Array]:
        n = self.model.connector.merge_size ** 2  # one merge window
        return dict(patches=jnp.zeros((1, n, patch_dim(self.model.vision))),
                    patch_positions=jnp.zeros((1, n, 2), jnp.int32), patch_segment_ids=jnp.ones((1, n), jnp.int32),
                    image_dest=jnp.full((1, 1), length, jnp.int32))

    def encode(self, vlm, images: dict[str, jax.Array]) -> jax.Array:
        """Packed patches [B, N, D] -> visual tokens [B, N / merge_size**2, hidden], one per merge window."""
        return vlm.connector(vlm.vision(images["patches"], images["patch_positions"], images["patch_segment_ids"]))

    def embed(self, vlm, x: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """The visual token of every real merge window written at its `image_dest` position: [B, N / m**2], or
        [B / g, g * N / m**2] for groups of g rows sharing their vision rows."""
        segment_ids, image_dest = images["patch_segment_ids"], images["image_dest"]
        visual = self.encode(vlm, images).astype(x.dtype)
        rows, length, width = x.shape
        groups = image_dest.shape[0]
        if rows % groups or image_dest.shape[1] * groups != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"image_dest {image_dest.shape} does not fit {rows} rows of {visual.shape[1]} merge "
                             "windows: [rows / g, g * windows] for groups of g rows (docs/contracts.md)")
        window = segment_ids.shape[1] // visual.shape[1]
        valid = segment_ids[:, ::window] > 0
        # A group's rows side by side: its vision rows' windows index the group's text rows as one sequence.
        x = scatter(x.reshape(groups, -1, width), visual.reshape(groups, -1, width), valid.reshape(groups, -1),
                    image_dest)
        return x.reshape(rows, length, width)

    def one_image_per_row(self, images: list, image_dest: np.ndarray) -> dict[str, jax.Array]:
        n, merge = max(p.shape[0] for p, _ in images), self.model.connector.merge_size
        rows = [pack_patches([im], n, patch_dim(self.model.vision), merge) for im in images]
        return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]} | dict(
            image_dest=jnp.asarray(image_dest))
