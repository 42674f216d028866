"""Parity checker: the PyTorch model of a checkpoint directory vs the same weights imported into vlm_jax,
run on the same random image(s) and tokens in fp32.

Reports per stage (`vision_features` = the tower's hidden_states[feature_layer] as the model uses them,
`projector` = the connector output, `logits`) and overall `max_abs_diff` and `max_rel_diff`; the relative
figure is max|jax - torch| / max|torch| per stage, so values near zero do not blow it up.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from jax.sharding import Mesh

from vlm_jax.data.navit import mrope_positions, pack_patches
from vlm_jax.interop import families
from vlm_jax.interop.hf_import import Source, import_params, model_config
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.model import VLM
from vlm_jax.params import unflat


def _diff(got: jax.Array, want: torch.Tensor) -> dict[str, float]:
    got, want = np.asarray(got, np.float64), want.detach().double().numpy()
    if got.shape != want.shape:
        raise AssertionError(f"shape mismatch: vlm_jax {got.shape} vs torch {want.shape}")
    err = float(np.max(np.abs(got - want)))
    return dict(max_abs_diff=err, max_rel_diff=err / max(float(np.max(np.abs(want))), 1e-30))


def _tokens(rng: np.random.Generator, vocab: int, shape: tuple[int, int], avoid: int = -1) -> np.ndarray:
    ids = rng.integers(0, vocab - 1, shape)
    return np.where(ids >= avoid, ids + 1, ids) if avoid >= 0 else ids


# Grids (t, h, w) of the random images the NaViT check packs into one sequence: several sizes and aspect ratios.
NAVIT_GRIDS = ((1, 4, 6), (1, 2, 2), (1, 6, 4))


def _navit_stages(tower: torch.nn.Module, model: ml_collections.ConfigDict, run: Callable,
                  rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Qwen2-VL's tower (last block's output) and merger on random images packed into one sequence."""
    v, merge = model.vision, model.connector.get("merge_size", 1)
    dim = 3 * v.temporal_patch_size * v.patch_size ** 2
    images = [(rng.standard_normal((math.prod(g), dim)).astype(np.float32), g) for g in NAVIT_GRIDS]
    row = pack_patches(images, sum(p.shape[0] for p, _ in images), dim, merge)
    args = [jnp.asarray(row[k][None]) for k in ("patches", "patch_positions", "patch_segment_ids")]
    want = tower(hidden_states=torch.from_numpy(row["patches"]), grid_thw=torch.tensor(NAVIT_GRIDS))
    return dict(vision_features=_diff(run(lambda m, *a: m.vision(*a), *args)[0], want.last_hidden_state),
                projector=_diff(run(lambda m, *a: m.encode_patches(*a), *args)[0], want.pooler_output))


def _qwen2_vl_logits(ref: torch.nn.Module, model: ml_collections.ConfigDict, run: Callable,
                     rng: np.random.Generator, length: int) -> dict[str, float]:
    """Whole Qwen2-VL: rows of text, one image's placeholder run (same count, different grids, so M-RoPE
    differs), text; positions from the layout (data/navit.py mrope_positions), images through the tower."""
    v, merge = model.vision, model.connector.get("merge_size", 1)
    dim, grids, image_id = 3 * v.temporal_patch_size * v.patch_size ** 2, NAVIT_GRIDS[::2], ref.config.image_token_id
    n = math.prod(grids[0]) // merge ** 2
    images = [(rng.standard_normal((math.prod(g), dim)).astype(np.float32), g) for g in grids]
    ids = _tokens(rng, model.text.vocab_size, (len(grids), length + n), avoid=image_id)
    ids[:, 2:2 + n] = image_id
    rows = [pack_patches([im], im[0].shape[0], dim, merge) for im in images]
    patches = [jnp.asarray(np.stack([r[k] for r in rows])) for k in ("patches", "patch_positions", "patch_segment_ids")]
    positions = np.stack([mrope_positions([2, g, length - 2], merge) for g in grids])
    got = run(lambda m, *a: m.forward_patches(*a), jnp.asarray(ids), jnp.asarray(positions),
              jnp.ones(ids.shape, jnp.int32), *patches, jnp.broadcast_to(jnp.arange(2, 2 + n), (len(grids), n)))
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(np.concatenate([p for p, _ in images])),
               image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.from_numpy((ids == image_id).astype(np.int64)))
    return _diff(got, want.logits)


def check(src: str, base_model: ml_collections.ConfigDict, mesh: Mesh, *, family: str | None = None,
          seed: int = 0, batch: int = 2, length: int = 12) -> dict[str, Any]:
    source = Source(src, family)
    if source.spec.torch_class is None:
        raise ConversionError(f"family {source.family!r} has no transformers class to compare against")
    model = model_config([source], base_model, "float32")
    model.dtype = "float32"
    params = unflat(import_params([source], model, mesh))
    ref = families.load_torch_class(source.spec.torch_class).from_pretrained(src, dtype=torch.float32).eval()
    vlm, v = VLM(model), model.vision
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, v.image_size, v.image_size)).astype(np.float32)
    tiles = jnp.asarray(pixels.transpose(0, 2, 3, 1))

    def run(method, *args):
        return jax.jit(lambda p, *a: vlm.apply({"params": p}, *a, method=method))(params, *args)

    stages = {}
    with torch.no_grad():
        if v.stem == "navit":
            stages.update(_navit_stages(ref.model.visual if source.family == "qwen2_vl" else ref, model, run, rng))
            if source.family == "qwen2_vl":
                stages["logits"] = _qwen2_vl_logits(ref, model, run, rng, length)
        elif "vision" in source.spec.parts:
            towers = {"llava": "model.vision_tower", "blip2": "vision_model"}
            tower = ref.get_submodule(towers[source.family]) if source.family in towers else ref
            out = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
            # BLIP-2's features are last_hidden_state: the last block's output through post_layernorm.
            want = out.last_hidden_state if v.post_norm else out.hidden_states[v.feature_layer]
            want = want[:, 1:] if v.drop_cls else want
            feats = run(lambda m, t: m.vision(t), tiles)
            stages["vision_features"] = _diff(feats, want)
        if source.family in ("llava", "blip2"):
            cfg = ref.config
            if source.family == "llava":
                projected = ref.model.multi_modal_projector(want)
            else:  # vision -> Q-Former -> language_projection
                projected = ref.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
            if cfg.image_token_id is None:
                # Ziya's own code prepends the queries instead; any id works, its embedding is overwritten.
                cfg.image_token_id = model.text.vocab_size - 1
            stages["projector"] = _diff(run(lambda m, t: m.connector(m.vision(t)), tiles), projected)
            per_image = projected.shape[1]
            ids = _tokens(rng, model.text.vocab_size, (batch, length + per_image), avoid=cfg.image_token_id)
            ids[:, 2:2 + per_image] = cfg.image_token_id
            logits = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits
            dest = jnp.broadcast_to(jnp.arange(2, 2 + per_image), (batch, per_image))
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
            got = run(lambda m, *a: m(*a), jnp.asarray(ids), positions, jnp.ones(ids.shape, jnp.int32),
                      tiles[:, None], jnp.ones((batch, 1), bool), dest)
            stages["logits"] = _diff(got, logits)
        elif "decoder" in source.spec.parts and v.stem != "navit":
            ids = _tokens(rng, model.text.vocab_size, (batch, length))
            logits = ref(input_ids=torch.from_numpy(ids)).logits
            positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
            got = run(lambda m, t, p: m.decoder(t, p, None), jnp.asarray(ids), positions)
            stages["logits"] = _diff(got, logits)
    return dict(family=source.family, max_abs_diff=max(s["max_abs_diff"] for s in stages.values()),
                max_rel_diff=max(s["max_rel_diff"] for s in stages.values()), **stages)
