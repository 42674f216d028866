"""CLIP vision tower (HF `CLIPVisionModel`, `vision_model.*`) <-> the `vision` ViT with the clip stem."""

from typing import Any

import ml_collections

from vlm_jax.interop.keymap import CONV, FLAT, LINEAR, LINEAR2, SAME, ConversionError, KeyMap

_L = "vision_model.encoder.layers.{i}."

ROWS = (
    ("vision_model.embeddings.patch_embedding.weight", "stem/patch_embed/kernel", CONV),
    ("vision_model.embeddings.class_embedding", "stem/cls_token", SAME),
    ("vision_model.embeddings.position_embedding.weight", "stem/pos_embed", SAME),
    ("vision_model.pre_layrnorm.weight", "stem/pre_norm/scale", SAME),
    ("vision_model.pre_layrnorm.bias", "stem/pre_norm/bias", SAME),
    (_L + "layer_norm1.weight", "layers/norm1/scale", SAME),
    (_L + "layer_norm1.bias", "layers/norm1/bias", SAME),
    (_L + "self_attn.q_proj.weight", "layers/attn/q_proj/kernel", LINEAR),
    (_L + "self_attn.q_proj.bias", "layers/attn/q_proj/bias", FLAT),
    (_L + "self_attn.k_proj.weight", "layers/attn/k_proj/kernel", LINEAR),
    (_L + "self_attn.k_proj.bias", "layers/attn/k_proj/bias", FLAT),
    (_L + "self_attn.v_proj.weight", "layers/attn/v_proj/kernel", LINEAR),
    (_L + "self_attn.v_proj.bias", "layers/attn/v_proj/bias", FLAT),
    (_L + "self_attn.out_proj.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_L + "self_attn.out_proj.bias", "layers/attn/o_proj/bias", SAME),
    (_L + "layer_norm2.weight", "layers/norm2/scale", SAME),
    (_L + "layer_norm2.bias", "layers/norm2/bias", SAME),
    (_L + "mlp.fc1.weight", "layers/mlp/fc1/kernel", LINEAR),
    (_L + "mlp.fc1.bias", "layers/mlp/fc1/bias", SAME),
    (_L + "mlp.fc2.weight", "layers/mlp/fc2/kernel", LINEAR),
    (_L + "mlp.fc2.bias", "layers/mlp/fc2/bias", SAME),
)
# transformers 5 saves CLIPVisionModel without the `vision_model.` prefix.
RENAMES = ((r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", r"vision_model.\1."),)
# A full CLIPModel checkpoint (e.g. openai/clip-vit-large-patch14-336) also holds the text tower.
IGNORE = (r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_scale", r".*position_ids")
# Our ViT stops at feature_layer: post_layernorm is never used.
EXTRAS = (("vision_model.post_layernorm.weight", "stem/pre_norm/scale"),
          ("vision_model.post_layernorm.bias", "stem/pre_norm/bias"))


def keymap(vision: ml_collections.ConfigDict) -> KeyMap:
    return KeyMap(ROWS, RENAMES, IGNORE, EXTRAS, hf_layers=(("layers", vision.depth),))


_ACTS = ("quick_gelu", "gelu")


def vision_config(hf: dict[str, Any], feature_layer: int = -2, drop_cls: bool = True) -> dict[str, Any]:
    """model.vision from an HF CLIPVisionConfig dict (or a CLIPConfig's `vision_config`)."""
    hf = hf.get("vision_config", hf)
    if hf.get("hidden_act", "quick_gelu") not in _ACTS:
        raise ConversionError(f"CLIP hidden_act {hf['hidden_act']!r} is not one of {_ACTS}")
    return dict(stem="clip", image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
                depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                mlp_act=hf.get("hidden_act", "quick_gelu"), norm_eps=hf.get("layer_norm_eps", 1e-5),
                pre_norm=True, feature_layer=feature_layer, drop_cls=drop_cls, qkv_bias="qkv", post_norm=False)


def hf_config(v: ml_collections.ConfigDict) -> dict[str, Any]:
    if v.stem != "clip" or not v.pre_norm:
        raise ConversionError(f"only the clip stem with pre_norm exports as CLIP, got stem={v.stem!r} "
                              f"pre_norm={v.pre_norm}")
    return dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"], hidden_size=v.width,
                intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.mlp_act,
                layer_norm_eps=v.norm_eps, num_channels=3)
