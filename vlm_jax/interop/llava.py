"""LLaVA-1.5 / ShareGPT4V: HF `LlavaForConditionalGeneration` and the original LLaVA repo's state dict.

HF legacy layout (on disk, what we write): `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`,
`language_model.model.*`, `language_model.lm_head.*`. Also read: the transformers >= 4.52 in-memory layout
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`) and the
transformers 5 files (`vision_tower.*` without `vision_model.`).
Original layout: the LLaMA names plus `model.mm_projector.{0,2}.*` (LLaVA's `mlp2x_gelu` projector is
`Sequential(Linear, GELU, Linear)`). The vision tower comes from a separate CLIP checkpoint, the one config.json's
`mm_vision_tower` names: LLaVA builds the tower with `delay_load` and loads it from there, so a copy the training
save left under `model.vision_tower.vision_tower.*` (the tower is a submodule while training) is never read, and
is skipped here too.
"""

from typing import Any

import ml_collections

from vlm_jax.interop import clip, llama, qwen2
from vlm_jax.interop.keymap import LINEAR, SAME, ConversionError, KeyMap

HF_PROJECTOR = (
    ("multi_modal_projector.linear_1.weight", "mlp/fc1/kernel", LINEAR),
    ("multi_modal_projector.linear_1.bias", "mlp/fc1/bias", SAME),
    ("multi_modal_projector.linear_2.weight", "mlp/fc2/kernel", LINEAR),
    ("multi_modal_projector.linear_2.bias", "mlp/fc2/bias", SAME),
)
HF_NEW_TO_LEGACY = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)
# The tower's copy in an original checkpoint (see above), not what LLaVA runs.
ORIGINAL_TOWER_COPY = (r"model\.vision_tower\..*",)
ORIGINAL_PROJECTOR = (
    ("model.mm_projector.0.weight", "mlp/fc1/kernel", LINEAR),
    ("model.mm_projector.0.bias", "mlp/fc1/bias", SAME),
    ("model.mm_projector.2.weight", "mlp/fc2/kernel", LINEAR),
    ("model.mm_projector.2.bias", "mlp/fc2/bias", SAME),
)

TEXT_FAMILIES = {"llama": llama, "qwen2": qwen2}


def text_family(text: ml_collections.ConfigDict) -> str:
    return "qwen2" if text.qkv_bias else "llama"


def hf_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    return (clip.keymap(model.vision).prefixed("vision_tower.", "vision")
            + KeyMap(HF_PROJECTOR).prefixed("", "connector")
            + TEXT_FAMILIES[text_family(model.text)].keymap(model.text).prefixed("language_model.", "decoder")
            ).with_renames(HF_NEW_TO_LEGACY)


def original_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    return (KeyMap(ORIGINAL_PROJECTOR, ignore=ORIGINAL_TOWER_COPY).prefixed("", "connector")
            + TEXT_FAMILIES[text_family(model.text)].keymap(model.text).prefixed("", "decoder"))


def _check_connector(model: ml_collections.ConfigDict) -> None:
    if model.connector.kind != "mlp" or model.connector.in_norm:
        raise ConversionError("LLaVA's projector is Linear-GELU-Linear without an input norm; this model has "
                              f"connector kind={model.connector.kind!r} in_norm={model.connector.in_norm}")


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision,connector,text} from an HF LlavaConfig dict."""
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise ConversionError("only the gelu projector with biases (LLaVA-1.5) is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer {layer}: concatenating several layers is not supported")
    text = hf["text_config"]
    if text.get("model_type", "llama") not in TEXT_FAMILIES:
        raise ConversionError(f"LLaVA text model {text.get('model_type')!r} is not one of {sorted(TEXT_FAMILIES)}")
    return dict(vision=clip.vision_config(hf["vision_config"], layer, strategy == "default"),
                connector=dict(kind="mlp", in_norm=False),
                text=TEXT_FAMILIES[text.get("model_type", "llama")].text_config(text))


def hf_config(model: ml_collections.ConfigDict, image_token_index: int) -> dict[str, Any]:
    _check_connector(model)
    v = model.vision
    tokens = (v.image_size // v.patch_size) ** 2 + (0 if v.drop_cls else 1)
    return dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                vision_config=clip.hf_config(v), text_config=TEXT_FAMILIES[text_family(model.text)].hf_config(model.text),
                image_token_index=image_token_index, vision_feature_layer=v.feature_layer,
                vision_feature_select_strategy="default" if v.drop_cls else "full",
                projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=tokens,
                tie_word_embeddings=model.text.tie_embeddings)


def original_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision,connector,text} from an original LLaVA / ShareGPT4V config.json (LLaMA fields at the
    top level plus `mm_*`). Vision fields other than the width come from the separate CLIP checkpoint."""
    if hf.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {hf.get('mm_projector_type')!r}: only mlp2x_gelu is supported")
    vision = dict(width=hf["mm_hidden_size"], feature_layer=hf.get("mm_vision_select_layer", -2),
                  drop_cls=hf.get("mm_vision_select_feature", "patch") == "patch")
    return dict(vision=vision, connector=dict(kind="mlp", in_norm=False), text=llama.text_config(hf))


def original_hf_config(model: ml_collections.ConfigDict, vision_tower: str) -> dict[str, Any]:
    _check_connector(model)
    if model.text.qkv_bias:
        raise ConversionError("the original LLaVA layout is LLaMA-only; this decoder has qkv_bias")
    v = model.vision
    return llama.hf_config(model.text, "llava_llama", "LlavaLlamaForCausalLM") | dict(
        mm_projector_type="mlp2x_gelu", mm_hidden_size=v.width, mm_vision_select_layer=v.feature_layer,
        mm_vision_select_feature="patch" if v.drop_cls else "cls_patch", mm_vision_tower=vision_tower,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad")
