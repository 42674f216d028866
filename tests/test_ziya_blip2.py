"""Ziya-BLIP2-14B: the Q-Former connector's fixed token count reaches the data side, and real sizes from
jax.eval_shape. Its tiny stage recipes run in tests/test_stage_configs.py."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from tests.helpers import ROOT, first_batch
from vlm_jax import parallel
from vlm_jax.config import load_config
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.params import abstract_params, param_shardings
from vlm_jax.qformer import QFormer
from vlm_jax.train import loop

ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "batch_size=2"]
# PyTorch counts (Blip2VisionConfig / Blip2QFormerConfig defaults, transformers 5.23): our ViT has no key
# bias, which the HF qkv.bias holds as a zero slice (39 layers x 1408).
EVA_VIT_G, QFORMER, QUERIES, PROJECTION = 985_952_256, 105_137_664, 32 * 768, 768 * 5120 + 5120


def ziya(arg: str, *extra: str):
    return load_config(os.path.join(ROOT, "configs", f"ziya_blip2_14b.py:{arg}"), list(extra))


def test_real_sizes_from_eval_shape():
    model = ziya("stage1").model
    count = {part: sum(math.prod(v.shape) for v in abstract_params(model, (part,)).values())
             for part in ("vision", "connector")}
    assert count["vision"] + 39 * 1408 == EVA_VIT_G  # about 986 M
    assert count["connector"] == QFORMER + QUERIES + PROJECTION  # query branch about 105 M
    groups = {r["group"]: r for r in loop.Setup(ziya("stage2"), jax.devices()[:1]).groups.table()}
    assert groups["projection"]["params"] == PROJECTION and set(groups) == {"projection", "frozen"}


def test_qformer_gives_num_queries_tokens_whatever_the_patch_count():
    c = ziya("stage1,tiny").model.connector
    qformer = QFormer(c, out_dim=48)
    for patches in (5, 17):
        features = jnp.ones((3, patches, 64))
        params = jax.eval_shape(qformer.init, jax.random.key(0), features)
        out = jax.eval_shape(qformer.apply, params, features)
        assert out.shape == (3, 32, 48)
    c.cross_attention_frequency = 0
    with pytest.raises(ValueError, match="cross_attention_frequency 0: must be at least 1"):
        jax.eval_shape(QFormer(c, out_dim=48).init, jax.random.key(0), features)


def test_placeholders_are_32_per_image():
    config = ziya("stage1,tiny", *ONE_DEVICE)
    assert tokens_per_tile(config.model, config.data.tile_size) == 32 and config.data.max_tiles == 1
    batch = first_batch(config)
    images = batch["tile_mask"].sum()
    assert images > 0 and batch["image_dest"].shape[1] == config.data.max_tiles_per_row * 32
    assert (batch["image_dest"] < config.data.seq_len).sum() == 32 * images


def test_real_size_vision_and_qformer_shard_over_the_mesh():
    """Logical axis names only: on a 4 (fsdp) x 2 (tensor) mesh every kernel of the EVA ViT-g and the
    Q-Former blocks (and the projection) is split 8 ways, the stem's 4 ways, as for the CLIP stem; a device
    holds about an eighth of their weights (norms are replicated)."""
    model = ziya("stage1").model
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    shapes = {k: v.shape for k, v in abstract_params(model, ("vision", "connector")).items()}
    shardings = param_shardings(model, ("vision", "connector"), mesh)
    total = local = 0
    for path, shape in shapes.items():
        local_shape = shardings[path].shard_shape(shape)
        if path.endswith("kernel") and "/stem/" not in path:
            assert math.prod(local_shape) * 8 == math.prod(shape), (path, shardings[path].spec)
        total, local = total + math.prod(shape), local + math.prod(local_shape)
    assert local < total / 7.9
