"""The VLM: vision tower -> connector -> placeholder scatter -> decoder (contract: docs/contracts.md).

Parameters: `vision` (ViT), `connector`, `decoder` (embedding, blocks, final norm, lm_head).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.connectors import CONNECTORS
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.text.decoder import Decoder
from vlm_jax.vision.vit import ViT


def _scatter(x: jax.Array, visual: jax.Array, valid: jax.Array, image_dest: jax.Array) -> jax.Array:
    """x [B, L, E] with visual [B, V, E] written at image_dest [B, V] where valid [B, V]. Invalid slots go out of
    range and are dropped, so padding cannot touch the text whatever image_dest holds for it."""
    dest = jnp.where(valid, image_dest, x.shape[1])
    return x.at[jnp.arange(x.shape[0])[:, None], dest].set(visual, mode="drop")


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


# The model inputs of a training batch, in the order the forward takes them (docs/contracts.md): tiles, or
# packed native-resolution patches for a NaViT model.
MODEL_INPUTS = ("tokens", "positions", "segment_ids", "tiles", "tile_mask", "image_dest")
NAVIT_INPUTS = ("tokens", "positions", "segment_ids", "patches", "patch_positions", "patch_segment_ids", "image_dest")


def model_inputs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch keys the training forward of `config` (config.model) takes, in order."""
    return NAVIT_INPUTS if config.vision.stem == "navit" else MODEL_INPUTS


def forward_method(config: ml_collections.ConfigDict):
    """The VLM method that runs a batch of `config` (config.model) to logits: tiles or packed patches."""
    return VLM.forward_patches if config.vision.stem == "navit" else VLM.__call__


def forward_nll(model: "VLM", variables: dict, batch: dict, **kwargs) -> jax.Array:
    """Training forward of `model` on a batch dict of either contract -> per-token fp32 NLL [B, L] of
    batch["targets"] (`VLM.token_nll`); `kwargs` go to apply (e.g. rngs)."""
    return model.apply(variables, batch["targets"], *(batch[k] for k in model_inputs(model.config)),
                       method=VLM.token_nll, **kwargs)


class VLM(nn.Module):
    config: ml_collections.ConfigDict  # config.model

    def setup(self) -> None:
        c = self.config
        if c.connector.kind not in CONNECTORS:
            raise ValueError(f"unknown connector {c.connector.kind!r}; choose from {sorted(CONNECTORS)}")
        options = ModuleOptions.from_config(c)
        self.vision = ViT(c.vision, options)
        self.connector = CONNECTORS[c.connector.kind](c.connector, c.text.hidden, options)
        self.decoder = Decoder(c.text, options)

    def encode_images(self, tiles: jax.Array) -> jax.Array:
        """tiles [B, T, S, S, 3] -> visual tokens [B, T*P, hidden], tile-major."""
        b, t = tiles.shape[:2]
        features = self.vision(tiles.reshape(b * t, *tiles.shape[2:]))
        merge = self.config.connector.get("merge_size", 1)
        if merge > 1:
            features = windows_first(features, merge)
        visual = self.connector(features)
        return visual.reshape(b, t * visual.shape[1], visual.shape[2])

    def encode_patches(self, patches: jax.Array, patch_positions: jax.Array, patch_segment_ids: jax.Array) -> jax.Array:
        """NaViT: packed patches [B, N, D] with their (row, col) [B, N, 2] and segment ids [B, N]
        (vlm_jax/data/navit.py) -> visual tokens [B, N / merge_size**2, hidden], one per merge window."""
        return self.connector(self.vision(patches, patch_positions, patch_segment_ids))

    def embed(self, tokens: jax.Array, tiles: jax.Array, tile_mask: jax.Array, image_dest: jax.Array) -> jax.Array:
        """Text embeddings with every real tile's visual tokens written at its `image_dest` positions."""
        x = self.decoder.embed(tokens)
        visual = self.encode_images(tiles).astype(x.dtype)
        per_tile = visual.shape[1] // tile_mask.shape[1]
        if image_dest.shape[1] != visual.shape[1]:
            raise ValueError(f"image_dest has {image_dest.shape[1]} slots for {visual.shape[1]} visual tokens "
                             f"({per_tile} per tile): reserve data.packing.tokens_per_tile placeholders per tile")
        return _scatter(x, visual, jnp.repeat(tile_mask, per_tile, axis=1), image_dest)

    def embed_patches(
        self, tokens: jax.Array, patches: jax.Array, patch_positions: jax.Array, patch_segment_ids: jax.Array,
        image_dest: jax.Array,
    ) -> jax.Array:
        """NaViT: text embeddings with the visual token of every real merge window written at its `image_dest`
        position: [B, N / merge_size**2], or [B / g, g * N / merge_size**2] for groups of g rows sharing their
        vision rows (docs/contracts.md)."""
        x = self.decoder.embed(tokens)
        visual = self.encode_patches(patches, patch_positions, patch_segment_ids).astype(x.dtype)
        rows, length, width = x.shape
        groups = image_dest.shape[0]
        if rows % groups or image_dest.shape[1] * groups != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"image_dest {image_dest.shape} does not fit {rows} rows of {visual.shape[1]} merge "
                             "windows: [rows / g, g * windows] for groups of g rows (docs/contracts.md)")
        window = patch_segment_ids.shape[1] // visual.shape[1]
        valid = patch_segment_ids[:, ::window] > 0
        # A group's rows side by side: its vision rows' windows index the group's text rows as one sequence.
        x = _scatter(x.reshape(groups, -1, width), visual.reshape(groups, -1, width), valid.reshape(groups, -1),
                     image_dest)
        return x.reshape(rows, length, width)

    def hidden_states_patches(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        patches: jax.Array, patch_positions: jax.Array, patch_segment_ids: jax.Array, image_dest: jax.Array,
    ) -> jax.Array:
        """NaViT model: final hidden states [B, L, hidden]; `positions` [B, L, 3] for M-RoPE."""
        x = self.embed_patches(tokens, patches, patch_positions, patch_segment_ids, image_dest)
        return self.decoder.hidden_states(x, positions, segment_ids)

    def hidden_states(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        tiles: jax.Array, tile_mask: jax.Array, image_dest: jax.Array,
    ) -> jax.Array:
        """Final hidden states [B, L, hidden]."""
        return self.decoder.hidden_states(self.embed(tokens, tiles, tile_mask, image_dest), positions, segment_ids)

    def forward_patches(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        patches: jax.Array, patch_positions: jax.Array, patch_segment_ids: jax.Array, image_dest: jax.Array,
    ) -> jax.Array:
        """Full forward of a NaViT model: fp32 logits [B, L, vocab]; `positions` [B, L, 3] for M-RoPE."""
        return self.decoder.logits(self.hidden_states_patches(
            tokens, positions, segment_ids, patches, patch_positions, patch_segment_ids, image_dest))

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        tiles: jax.Array, tile_mask: jax.Array, image_dest: jax.Array,
    ) -> jax.Array:
        """Full forward: fp32 logits [B, L, vocab]."""
        return self.decoder.logits(self.hidden_states(tokens, positions, segment_ids, tiles, tile_mask, image_dest))

    def token_nll(self, targets: jax.Array, *inputs: jax.Array) -> jax.Array:
        """Training forward: target ids [B, L] and the batch's `model_inputs` (either contract) -> per-token
        fp32 NLL [B, L], the vocabulary walked model.loss_vocab_chunk logits at a time, so no fp32 logits
        [B, L, vocab] are made when the vocabulary is larger (Decoder.token_nll)."""
        hidden = self.hidden_states_patches if self.config.vision.stem == "navit" else self.hidden_states
        # Configs saved before model.loss_vocab_chunk existed computed the logits at once.
        return self.decoder.token_nll(hidden(*inputs), targets, self.config.get("loss_vocab_chunk", 0))

    def prefill(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        tiles: jax.Array, tile_mask: jax.Array, image_dest: jax.Array, cache_len: int,
    ) -> jax.Array:
        """Runs right-padded prompts (one example per row, prompt = where segment_ids > 0) and fills a KV
        cache of `cache_len` slots; apply with mutable=['cache']. Returns fp32 next-token logits [B, vocab]
        (only at each row's last prompt token: full-prompt logits would be [B, L, vocab])."""
        return self._prefill(self.embed(tokens, tiles, tile_mask, image_dest), positions, segment_ids, cache_len)

    def prefill_patches(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, patches: jax.Array,
        patch_positions: jax.Array, patch_segment_ids: jax.Array, image_dest: jax.Array, cache_len: int,
    ) -> jax.Array:
        """`prefill` for a NaViT model: the prompts' images as packed patches (docs/contracts.md)."""
        x = self.embed_patches(tokens, patches, patch_positions, patch_segment_ids, image_dest)
        return self._prefill(x, positions, segment_ids, cache_len)

    def _prefill(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache_len: int) -> jax.Array:
        h = self.decoder.hidden_states(x, positions, segment_ids, cache_mode="prefill", cache_len=cache_len)
        last = jnp.sum(segment_ids > 0, axis=1) - 1
        return self.decoder.logits(h[jnp.arange(h.shape[0]), last][:, None])[:, 0]

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, cache_slots: jax.Array | None = None,
    ) -> jax.Array:
        """One token per row, tokens [B], against the cache; apply with mutable=['cache']. positions: its RoPE
        position [B] ([B, 3] for M-RoPE); cache_slots [B]: the slot it fills and attends up to, by default its
        1-D position (prompts laid out 0, 1, 2, ...). Returns fp32 next-token logits [B, vocab]."""
        if cache_slots is None:
            if positions.ndim != 1:
                raise ValueError(f"positions {positions.shape} are not cache slots: pass cache_slots [B]")
            cache_slots = positions
        x = self.decoder.embed(tokens[:, None])
        h = self.decoder.hidden_states(x, positions[:, None], None, cache_mode="decode",
                                       cache_slots=cache_slots[:, None])
        return self.decoder.logits(h)[:, 0]
