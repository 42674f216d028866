"""Qwen2-VL's vision tower (HF `Qwen2VisionTransformerPretrainedModel`) <-> the `vision` ViT with the navit
stem, and its `merger` <-> the `connector` (MLPProjector with merge_size 2, the PatchMerger); the whole
`Qwen2VLForConditionalGeneration` adds its Qwen2 decoder with M-RoPE <-> `decoder`.

Tower names are relative to the tower; a whole model holds them under `visual.` (transformers <= 4.51, and
what `save_pretrained` writes: with `model.*` and `lm_head.*` for the LLM) or `model.visual.` (>= 4.52 in
memory: with `model.language_model.*`). POINTS1.5 mounts the same blocks under `vision_encoder.` and a
separately trained merger as `vision_projector.` (interop/points.py).
"""

from typing import Any

import ml_collections

from vlm_jax.interop import qwen2
from vlm_jax.interop.keymap import CONV3D, FLAT, LINEAR, LINEAR2, SAME, ConversionError, KeyMap

_B = "blocks.{i}."
_QKV = tuple(f"layers/attn/{x}_proj/kernel" for x in "qkv")
_QKV_BIAS = tuple(f"layers/attn/{x}_proj/bias" for x in "qkv")

TOWER_ROWS = (
    ("patch_embed.proj.weight", "stem/patch_embed/kernel", CONV3D),
    (_B + "norm1.weight", "layers/norm1/scale", SAME),
    (_B + "norm1.bias", "layers/norm1/bias", SAME),
    (_B + "attn.qkv.weight", _QKV, LINEAR, "concat"),  # block layout [Wq; Wk; Wv]
    (_B + "attn.qkv.bias", _QKV_BIAS, FLAT, "concat"),
    (_B + "attn.proj.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_B + "attn.proj.bias", "layers/attn/o_proj/bias", SAME),
    (_B + "norm2.weight", "layers/norm2/scale", SAME),
    (_B + "norm2.bias", "layers/norm2/bias", SAME),
    (_B + "mlp.fc1.weight", "layers/mlp/fc1/kernel", LINEAR),
    (_B + "mlp.fc1.bias", "layers/mlp/fc1/bias", SAME),
    (_B + "mlp.fc2.weight", "layers/mlp/fc2/kernel", LINEAR),
    (_B + "mlp.fc2.bias", "layers/mlp/fc2/bias", SAME),
)
# PatchMerger: ln_q, then mlp = Sequential(Linear, GELU, Linear).
MERGER_ROWS = (
    ("ln_q.weight", "in_norm/scale", SAME),
    ("ln_q.bias", "in_norm/bias", SAME),
    ("mlp.0.weight", "mlp/fc1/kernel", LINEAR),
    ("mlp.0.bias", "mlp/fc1/bias", SAME),
    ("mlp.2.weight", "mlp/fc2/kernel", LINEAR),
    ("mlp.2.bias", "mlp/fc2/bias", SAME),
)
# HF hard-codes these LayerNorm epsilons (blocks and merger).
NORM_EPS = 1e-6


def is_tower(vision: ml_collections.ConfigDict) -> bool:
    """Whether model.vision `vision` is the tower this module maps (export picks Qwen2-VL's layouts by it)."""
    return vision.stem == "navit"


def tower_keymap(vision: ml_collections.ConfigDict) -> KeyMap:
    """The blocks and patch embedding, relative to the tower, over the `vision` subtree's paths."""
    return KeyMap(TOWER_ROWS, hf_layers=(("layers", vision.depth),))


def vision_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """A standalone tower checkpoint (no prefix), or the vision part of a whole Qwen2-VL checkpoint of either
    naming generation (its LLM tensors are skipped)."""
    return (tower_keymap(model.vision).prefixed("", "vision") + KeyMap(MERGER_ROWS).prefixed("merger.", "connector")
            + KeyMap((), renames=((r"^(model\.)?visual\.", ""),), ignore=(r"model\..*", r"lm_head\..*")))


def _rope_theta(hf: dict[str, Any]) -> float:
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision, connector} (and the LLM width the merger projects to) from a Qwen2VLVisionConfig dict, or
    from a whole Qwen2VLConfig's `vision_config`."""
    v = hf.get("vision_config", hf)
    if v.get("in_channels", 3) != 3:
        raise ConversionError(f"Qwen2-VL vision in_channels {v['in_channels']}: only RGB (3) is supported")
    width, merge = v["embed_dim"], v["spatial_merge_size"]
    vision = dict(stem="navit", patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                  width=width, depth=v["depth"], heads=v["num_heads"], mlp_dim=int(width * v["mlp_ratio"]),
                  mlp_act=v["hidden_act"], norm_eps=NORM_EPS, rope_base=_rope_theta(v), pre_norm=False,
                  post_norm=False, qkv_bias="qkv", feature_layer=-1, drop_cls=False)
    connector = dict(kind="mlp", in_norm=True, norm_eps=NORM_EPS, merge_size=merge, hidden_dim=width * merge ** 2)
    return dict(vision=vision, connector=connector, text=dict(hidden=v["hidden_size"]))


def check_exportable(model: ml_collections.ConfigDict) -> None:
    """Raises unless the vision tower and connector are exactly what the Qwen2-VL classes compute."""
    v, c = model.vision, model.connector
    merge = c.merge_size  # Qwen2-VL's spatial_merge_size
    problems = [f"{k}={got!r} (Qwen2-VL: {want!r})" for k, got, want in (
        ("vision.stem", v.stem, "navit"), ("vision.norm_eps", v.norm_eps, NORM_EPS),
        ("vision.feature_layer", v.feature_layer % (v.depth + 1), v.depth), ("connector.kind", c.kind, "mlp"),
        ("connector.in_norm", c.in_norm, True), ("connector.norm_eps", c.norm_eps, NORM_EPS),
        ("connector.hidden_dim", c.hidden_dim, v.width * merge ** 2),
        ("vision.mlp_dim % width", v.mlp_dim % v.width, 0)) if got != want]
    if problems:
        raise ConversionError("this model does not export as a Qwen2-VL vision tower: " + ", ".join(problems))


def hf_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json of `Qwen2VisionTransformerPretrainedModel` (model_type qwen2_vl_vision)."""
    check_exportable(model)
    v = model.vision
    return dict(model_type="qwen2_vl_vision", architectures=["Qwen2VisionTransformerPretrainedModel"],
                depth=v.depth, embed_dim=v.width, hidden_size=model.text.hidden, hidden_act=v.mlp_act,
                mlp_ratio=v.mlp_dim // v.width, num_heads=v.heads, in_channels=3, patch_size=v.patch_size,
                spatial_merge_size=model.connector.merge_size, temporal_patch_size=v.temporal_patch_size,
                rope_parameters=dict(rope_theta=v.rope_base, rope_type="axial"))


# transformers >= 4.52 in-memory names -> the legacy names the rows use.
NEW_TO_LEGACY = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."))


def whole_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """A whole `Qwen2VLForConditionalGeneration` checkpoint (either naming generation)."""
    return (tower_keymap(model.vision).prefixed("visual.", "vision")
            + KeyMap(MERGER_ROWS).prefixed("visual.merger.", "connector")
            + qwen2.keymap(model.text).prefixed("", "decoder")).with_renames(NEW_TO_LEGACY)


def whole_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision, connector, text} from a Qwen2VLConfig dict: the text fields sit in `text_config`
    (transformers 5) or at the top level (4.x), the M-RoPE sections in rope_parameters / rope_scaling."""
    text = dict(hf.get("text_config") or hf)
    rope = dict(text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {})
    sections = rope.get("mrope_section")
    if not sections:
        raise ConversionError(f"Qwen2-VL text config has no mrope_section in its RoPE settings {rope}")
    text["rope_parameters"] = dict(rope_theta=rope.get("rope_theta", text.get("rope_theta", 1e6)))
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    out = model_config(hf)
    out["text"] = qwen2.text_config(text) | dict(rope_kind="mrope", mrope_sections=list(sections))
    return out


def whole_hf_config(model: ml_collections.ConfigDict, image_token_id: int) -> dict[str, Any]:
    """config.json of `Qwen2VLForConditionalGeneration` (transformers 5 layout)."""
    t = model.text
    if t.rope_kind != "mrope":
        raise ConversionError("Qwen2-VL's decoder uses M-RoPE; this decoder has rope_kind "
                              f"{t.rope_kind!r} (a POINTS1.5-style model has no transformers class)")
    text = qwen2.hf_config(t)
    for key in ("architectures", "rope_theta", "tie_word_embeddings"):
        text.pop(key)
    text.update(model_type="qwen2_vl_text", rope_parameters=dict(
        rope_type="default", rope_theta=t.rope_base, mrope_section=list(t.mrope_sections)))
    return dict(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
                vision_config=hf_config(model), text_config=text, image_token_id=image_token_id,
                tie_word_embeddings=t.tie_embeddings)
