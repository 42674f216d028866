"""Which key map, config translation and PyTorch class go with each family, and how to tell them apart."""

import importlib
import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from vlm_jax.interop import blip2, clip, llama, llava, points, qwen1, qwen2, qwen2_vl, qwen2_vl_check, qwen_vl
from vlm_jax.interop.keymap import ConversionError, KeyMap


@dataclasses.dataclass(frozen=True)
class Family:
    parts: tuple[str, ...]  # the VLM subtrees its checkpoints hold
    keymap: Callable[[ml_collections.ConfigDict], KeyMap]  # model config -> key map over those subtrees
    model_config: Callable[[dict[str, Any]], dict[str, Any]]  # HF config.json -> model.{vision,connector,text}
    # The transformers class that loads it, by name or by module path under transformers for classes the
    # package does not export (None: the original repo's code).
    torch_class: str | None
    # Its own stages of the parity check (interop/check.py), where the generic tile and decoder comparisons do not
    # fit it: (torch model, model config, run, rng, tokens, length) -> stage -> (vlm_jax output, torch output).
    check: Callable | None = None


FAMILIES: dict[str, Family] = {
    "clip": Family(("vision",), lambda m: clip.keymap(m.vision).prefixed("", "vision"),
                   lambda hf: dict(vision=clip.vision_config(hf)), "CLIPVisionModel"),
    "llama": Family(("decoder",), lambda m: llama.keymap(m.text).prefixed("", "decoder"),
                    lambda hf: dict(text=llama.text_config(hf)), "LlamaForCausalLM"),
    "qwen2": Family(("decoder",), lambda m: qwen2.keymap(m.text).prefixed("", "decoder"),
                    lambda hf: dict(text=qwen2.text_config(hf)), "Qwen2ForCausalLM"),
    "llava": Family(("vision", "connector", "decoder"), llava.hf_keymap, llava.model_config,
                    "LlavaForConditionalGeneration"),
    "blip2": Family(("vision", "connector", "decoder"), blip2.keymap, blip2.model_config,
                    "Blip2ForConditionalGeneration"),
    "blip2_visual": Family(("vision", "connector"), blip2.visual_keymap, blip2.visual_model_config, None),
    "llava_original": Family(("connector", "decoder"), llava.original_keymap, llava.original_model_config, None),
    "qwen2_vl_vision": Family(("connector", "vision"), qwen2_vl.vision_keymap, qwen2_vl.model_config,
                              "models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
                              qwen2_vl_check.check_tower),
    "qwen2_vl": Family(("connector", "decoder", "vision"), qwen2_vl.whole_keymap, qwen2_vl.whole_model_config,
                       "Qwen2VLForConditionalGeneration", qwen2_vl_check.check_whole),
    "points": Family(("connector", "decoder", "vision"), points.keymap, points.model_config, None),
    "points_qwen2": Family(("connector", "decoder", "vision"), points.qwen2_keymap, points.qwen2_model_config, None),
    "points_llm": Family(("decoder",), lambda m: points.KEYMAP.prefixed("", "decoder"),
                         lambda hf: dict(text=points.text_config(hf)), None),
    # Remote code only (QWenLMHeadModel): compared against Qwen2ForCausalLM in tests/test_interop_qwen1.py.
    "qwen1": Family(("decoder",), lambda m: qwen1.KEYMAP.prefixed("", "decoder"),
                    lambda hf: dict(text=qwen1.text_config(hf)), None),
    # Qwen-VL / Belle-VL (remote code): compared against a reference module in tests/test_interop_qwen_vl.py.
    "qwen_vl": Family(("vision", "connector", "decoder"), qwen_vl.keymap, qwen_vl.model_config, None),
}

_BY_MODEL_TYPE = {"clip_vision_model": "clip", "clip": "clip", "llama": "llama", "qwen2": "qwen2",
                  "llava": "llava", "blip-2": "blip2", "llava_llama": "llava_original",
                  "share4v": "llava_original",
                  "qwen2_vl_vision": "qwen2_vl_vision", "qwen2_vl": "qwen2_vl", "qwen": "qwen1"}


def detect(hf: dict[str, Any], where: str) -> str:
    """The family of an HF config.json dict."""
    if "mm_projector_type" in hf:  # the original LLaVA repo (and ShareGPT4V) config
        return "llava_original"
    if hf.get("model_type") == "qwen" and "visual" in hf:  # Qwen-VL / Belle-VL: Qwen1 plus the visual tower
        return "qwen_vl"
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ConversionError(f"{where}: model_type {model_type!r} is not one of {sorted(_BY_MODEL_TYPE)}; "
                              f"pass the family explicitly ({sorted(FAMILIES)})")
    return _BY_MODEL_TYPE[model_type]


def load_torch_class(name: str) -> type:
    """A Family.torch_class: a top-level transformers name or a module path under transformers."""
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module("transformers" + (f".{module}" if module else "")), cls)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ConversionError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]
