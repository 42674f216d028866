"""The VLM: vision tower -> connector -> placeholder scatter -> decoder (contract: docs/contracts.md). How the
images enter (tiles or packed patches: the tower call and the scatter) is the image-input kind's
(vlm_jax/image_inputs/); the forward, prefill and decode step take its arrays as one `images` dict.

Parameters: `vision` (ViT), `connector`, `decoder` (embedding, blocks, final norm, lm_head).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import image_inputs
from vlm_jax.connectors import CONNECTORS
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.text.decoder import Decoder
from vlm_jax.vision.vit import ViT


def forward_nll(model: "VLM", variables: dict, batch: dict, **kwargs) -> jax.Array:
    """Forward of `model` on a flat batch dict (docs/contracts.md) -> per-token fp32 NLL [B, L] of
    batch["targets"] from the whole logits (`VLM.token_nll`); `kwargs` go to apply (e.g. rngs)."""
    images = image_inputs.make(model.config).select(batch)
    return model.apply(variables, batch["targets"], batch["tokens"], batch["positions"], batch["segment_ids"], images,
                       method=VLM.token_nll, **kwargs)


def forward_loss(model: "VLM", variables: dict, batch: dict, weights: jax.Array,
                 **kwargs) -> tuple[jax.Array, jax.Array]:
    """Training forward of `model` on a flat batch dict -> (sum of `weights` [B, L] x NLL of batch["targets"],
    per-token fp32 NLL [B, L] without a gradient, NaN where the weight is 0): `VLM.loss`; `kwargs` go to apply
    (e.g. rngs)."""
    images = image_inputs.make(model.config).select(batch)
    return model.apply(variables, batch["targets"], weights, batch["tokens"], batch["positions"],
                       batch["segment_ids"], images, method=VLM.loss, **kwargs)


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
        # The kind owns the encoder call and the scatter: one forward serves tiles and packed patches alike.
        self.image_inputs = image_inputs.make(c)

    def encode_images(self, images: dict[str, jax.Array]) -> jax.Array:
        """The image-input kind's arrays -> visual tokens [B, V, hidden] (tower + connector)."""
        return self.image_inputs.encode(self, images)

    def embed(self, tokens: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """Text embeddings [B, L, hidden] with the visual tokens of `images` written at their placeholders."""
        return self.image_inputs.embed(self, self.decoder.embed(tokens), images)

    def hidden_states(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, images: dict[str, jax.Array],
    ) -> jax.Array:
        """Final hidden states [B, L, hidden]; `positions` [B, L, 3] for M-RoPE."""
        return self.decoder.hidden_states(self.embed(tokens, images), positions, segment_ids)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, images: dict[str, jax.Array],
    ) -> jax.Array:
        """Full forward: fp32 logits [B, L, vocab]."""
        return self.decoder.logits(self.hidden_states(tokens, positions, segment_ids, images))

    def token_nll(
        self, targets: jax.Array, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
        images: dict[str, jax.Array],
    ) -> jax.Array:
        """Target ids [B, L] -> per-token fp32 NLL [B, L] from the whole logits (Decoder.token_nll)."""
        return self.decoder.token_nll(self.hidden_states(tokens, positions, segment_ids, images), targets)

    def loss(
        self, targets: jax.Array, weights: jax.Array, tokens: jax.Array, positions: jax.Array,
        segment_ids: jax.Array, images: dict[str, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        """Training forward: (sum of `weights` x NLL of `targets`, per-token fp32 NLL [B, L] without a gradient, NaN
        where the weight is 0), model.loss_chunk_tokens positions of each device's rows at a time, so no fp32 logits
        [B, L, vocab] are made, and only positions of nonzero weight computed (Decoder.loss)."""
        return self.decoder.loss(self.hidden_states(tokens, positions, segment_ids, images), targets, weights,
                                 self.config.loss_chunk_tokens)

    def prefill(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, images: dict[str, jax.Array],
        cache_len: int,
    ) -> jax.Array:
        """Runs right-padded prompts (one example per row, prompt = where segment_ids > 0) and fills a KV
        cache of `cache_len` slots; apply with mutable=['cache']. Returns fp32 next-token logits [B, vocab]
        (only at each row's last prompt token: full-prompt logits would be [B, L, vocab])."""
        h = self.decoder.hidden_states(self.embed(tokens, images), positions, segment_ids, cache_mode="prefill",
                                       cache_len=cache_len)
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
