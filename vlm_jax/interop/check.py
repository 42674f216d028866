"""Parity checker: the PyTorch model of a checkpoint directory vs the same weights imported into vlm_jax,
run on the same random image(s) and tokens in fp32, or (`image`, LLaVA) on one image file and a question.

Reports per stage (`vision_features` = the tower's hidden_states[feature_layer] as the model uses them,
`projector` = the connector output, `logits`) and overall `max_abs_diff` and `max_rel_diff`; the relative
figure is max|jax - torch| / max|torch| per stage, so values near zero do not blow it up. With an image each side
preprocesses it itself: the directory's own transformers processor for PyTorch, vlm_jax's reading of the same
processor file (data/image_processor.py) for vlm_jax, and `pixel_max_abs_diff` compares the two.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers
from jax.sharding import Mesh
from transformers.image_utils import load_image as hf_load_image

from vlm_jax import image_inputs
from vlm_jax.data.image_processor import read_processor
from vlm_jax.data.images import load_image
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


DEFAULT_QUESTION = "What is shown in this image?"
# LLaVA-1.5's prompt as the llava-hf model cards write it.
LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"


def _image_inputs(src: str, image: str, question: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PyTorch pixel_values [1, 3, H, W] and input_ids [1, L] from the directory's own processor on `image` and
    the question's prompt, vlm_jax's pixels [1, H, W, 3] of the same image from the same processor file)."""
    try:
        processor = transformers.AutoProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{src}: check --image needs the checkpoint's processor and tokenizer: {e}") from e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ConversionError(f"{src}: check --image needs a processor with an image processor and a tokenizer "
                              f"(processor_config.json); AutoProcessor gives {type(processor).__name__}")
    prompt = LLAVA_PROMPT.format(image=processor.image_token, question=question)
    out = processor(images=hf_load_image(image), text=prompt, return_tensors="np")
    ours = read_processor(src)[0].apply(load_image(image))[None]
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["input_ids"]), ours


def _generic_stages(ref: torch.nn.Module, source: Source, model: ml_collections.ConfigDict, run,
                    rng: np.random.Generator, pixels: np.ndarray, views: jax.Array, batch: int,
                    length: int, ids: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """The stages of a family without its own check: a tiled tower, its connector and the whole model's logits
    on one view per row (PyTorch's `pixels`, vlm_jax's `views`) with random tokens around its placeholders, or
    the given `ids` holding them; or a decoder's logits."""
    v, stages = model.vision, {}
    if "vision" in source.spec.parts:
        towers = {"llava": "model.vision_tower", "blip2": "vision_model"}
        tower = ref.get_submodule(towers[source.family]) if source.family in towers else ref
        out = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
        # BLIP-2's features are last_hidden_state: the last block's output through post_layernorm.
        want = out.last_hidden_state if v.post_norm else out.hidden_states[v.feature_layer]
        want = want[:, 1:] if v.drop_cls else want
        feats = run(lambda m, t: m.vision(t), views)
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
        stages["projector"] = _diff(run(lambda m, t: m.connector(m.vision(t)), views), projected)
        per_image = projected.shape[1]
        if ids is None:
            ids = _tokens(rng, model.text.vocab_size, (batch, length + per_image), avoid=cfg.image_token_id)
            ids[:, 2:2 + per_image] = cfg.image_token_id
        slots = [np.flatnonzero(row == cfg.image_token_id) for row in ids]
        if any(len(s) != per_image for s in slots):
            raise ConversionError(f"the prompt holds {[len(s) for s in slots]} image tokens "
                                  f"(id {cfg.image_token_id}); the model makes {per_image} per image")
        logits = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits
        images = image_inputs.make(model).one_image_per_row(list(views), np.stack(slots))
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        got = run(lambda m, *a: m(*a), jnp.asarray(ids), positions, jnp.ones(ids.shape, jnp.int32), images)
        stages["logits"] = _diff(got, logits)
    elif "decoder" in source.spec.parts:
        ids = _tokens(rng, model.text.vocab_size, (batch, length))
        logits = ref(input_ids=torch.from_numpy(ids)).logits
        positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
        got = run(lambda m, t, p: m.decoder(t, p, None), jnp.asarray(ids), positions)
        stages["logits"] = _diff(got, logits)
    return stages


def check(src: str, base_model: ml_collections.ConfigDict, mesh: Mesh, *, family: str | None = None,
          seed: int = 0, batch: int = 2, length: int = 12, image: str | None = None,
          question: str = DEFAULT_QUESTION) -> dict[str, Any]:
    """The report of one checkpoint directory (module docstring); `image` (a file, LLaVA only) replaces the random
    pixels and tokens with that image, each side preprocessing it itself, and `question` as a prompt."""
    source = Source(src, family)
    if source.spec.torch_class is None:
        raise ConversionError(f"family {source.family!r} has no transformers class to compare against")
    if image is not None and source.family != "llava":
        raise ConversionError(f"check --image runs LLaVA checkpoints (family llava); {src} is {source.family!r}")
    model = model_config([source], base_model, "float32")
    model.dtype = "float32"
    params = unflat(import_params([source], model, mesh))
    ref = families.load_torch_class(source.spec.torch_class).from_pretrained(src, dtype=torch.float32).eval()
    vlm, v = VLM(model), model.vision
    rng = np.random.default_rng(seed)
    ids, extra = None, {}
    if image is None:
        pixels = rng.standard_normal((batch, 3, v.image_size, v.image_size)).astype(np.float32)
        views = pixels.transpose(0, 2, 3, 1)
    else:
        pixels, ids, views = _image_inputs(src, image, question)
        if views.shape != pixels.transpose(0, 2, 3, 1).shape:
            raise AssertionError(f"pixel shape mismatch: vlm_jax {views.shape[1:3]} vs transformers "
                                 f"{pixels.shape[2:]}")
        extra["pixel_max_abs_diff"] = float(np.max(np.abs(views - pixels.transpose(0, 2, 3, 1))))
    views = jnp.asarray(views)

    def run(method, *args):
        return jax.jit(lambda p, *a: vlm.apply({"params": p}, *a, method=method))(params, *args)

    with torch.no_grad():
        if source.spec.check is not None:
            stages = {k: _diff(got, want) for k, (got, want) in
                      source.spec.check(ref, model, run, rng, _tokens, length).items()}
        else:
            stages = _generic_stages(ref, source, model, run, rng, pixels, views, batch, length, ids)
    return dict(family=source.family, max_abs_diff=max(s["max_abs_diff"] for s in stages.values()),
                max_rel_diff=max(s["max_rel_diff"] for s in stages.values()), **extra, **stages)
