"""Qwen2-VL's stages of the parity check (interop/check.py): its tower and merger on random images packed into
one sequence, and the whole model's logits with M-RoPE positions from the images' grids. Each returns stage ->
(vlm_jax output, torch output); `run(method, *args)` applies the imported weights, `tokens(rng, vocab, shape,
avoid)` draws random ids."""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from vlm_jax import image_inputs
from vlm_jax.data.image_kinds import patch_dim
from vlm_jax.data.navit import mrope_positions, pack_patches

# Grids (t, h, w) of the random images the check packs into one sequence: several sizes and aspect ratios.
CHECK_GRIDS = ((1, 4, 6), (1, 2, 2), (1, 6, 4))
Stages = dict[str, tuple[jax.Array, torch.Tensor]]


def _random_images(model: ml_collections.ConfigDict, rng: np.random.Generator, grids) -> list:
    dim = patch_dim(model.vision)
    return [(rng.standard_normal((math.prod(g), dim)).astype(np.float32), g) for g in grids]


def tower_stages(tower: torch.nn.Module, model: ml_collections.ConfigDict, run: Callable,
                 rng: np.random.Generator) -> Stages:
    """The tower's last block's output (`vision_features`) and the merger's (`projector`)."""
    images = _random_images(model, rng, CHECK_GRIDS)
    row = pack_patches(images, sum(p.shape[0] for p, _ in images), images[0][0].shape[1],
                       model.connector.merge_size)
    packed = {k: jnp.asarray(v[None]) for k, v in row.items()}
    want = tower(hidden_states=torch.from_numpy(row["patches"]), grid_thw=torch.tensor(CHECK_GRIDS))
    features = run(lambda m, p: m.vision(p["patches"], p["patch_positions"], p["patch_segment_ids"]), packed)
    return dict(vision_features=(features[0], want.last_hidden_state),
                projector=(run(lambda m, p: m.encode_images(p), packed)[0], want.pooler_output))


def check_tower(ref: torch.nn.Module, model: ml_collections.ConfigDict, run: Callable, rng: np.random.Generator,
                tokens: Callable, length: int) -> Stages:
    """A standalone tower checkpoint (`Qwen2VisionTransformerPretrainedModel`)."""
    return tower_stages(ref, model, run, rng)


def check_whole(ref: torch.nn.Module, model: ml_collections.ConfigDict, run: Callable, rng: np.random.Generator,
                tokens: Callable, length: int) -> Stages:
    """The whole Qwen2-VL: its tower's stages, then rows of text, one image's placeholder run (same count,
    different grids, so M-RoPE differs), text; positions from the layout (data/navit.py mrope_positions)."""
    stages = tower_stages(ref.model.visual, model, run, rng)
    merge, grids, image_id = model.connector.merge_size, CHECK_GRIDS[::2], ref.config.image_token_id
    n = math.prod(grids[0]) // merge ** 2
    images = _random_images(model, rng, grids)
    ids = tokens(rng, model.text.vocab_size, (len(grids), length + n), avoid=image_id)
    ids[:, 2:2 + n] = image_id
    positions = np.stack([mrope_positions([2, g, length - 2], merge) for g in grids])
    dest = np.broadcast_to(np.arange(2, 2 + n), (len(grids), n))
    inputs = image_inputs.make(model).one_image_per_row(images, dest)
    got = run(lambda m, *a: m(*a), jnp.asarray(ids), jnp.asarray(positions), jnp.ones(ids.shape, jnp.int32), inputs)
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(np.concatenate([p for p, _ in images])),
               image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.from_numpy((ids == image_id).astype(np.int64)))
    return stages | dict(logits=(got, want.logits))
