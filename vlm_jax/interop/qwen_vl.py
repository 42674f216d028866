"""Qwen-VL / Belle-VL checkpoints (remote code, `model_type "qwen"` with a `visual` block; docs/architectures.md 4)
<-> the VLM with the `qwenvl` ViT, the `resampler` connector and the Qwen1 decoder (interop/qwen1.py).

`transformer.visual.*`: `attn.in_proj` of the ViT blocks is per-head interleaved (rows viewed as
`(heads, 3, head_dim)`), the resampler's `attn.in_proj_weight` (nn.MultiheadAttention) is in block layout,
`proj` is used as `x @ proj` (kept as is, not transposed), `attn_pool.pos_embed` is the fixed sin-cos table.
"""

from typing import Any

import ml_collections

from vlm_jax.interop import qwen1
from vlm_jax.interop.keymap import CONV, FLAT, LINEAR, LINEAR2, SAME, ConversionError, KeyMap, norm_rows as _norm

_V = "transformer.visual."
_VL = _V + "transformer.resblocks.{i}."
_P = _V + "attn_pool."
_QKV = ("q", "k", "v")


def _qkv(path: str, leaf: str) -> tuple[str, ...]:
    return tuple(f"{path}/{x}_proj/{leaf}" for x in _QKV)


VISION = (
    (_V + "conv1.weight", "stem/patch_embed/kernel", CONV),
    (_V + "positional_embedding", "stem/pos_embed", SAME),
    *_norm(_V + "ln_pre", "stem/pre_norm"),
    *_norm(_VL + "ln_1", "layers/norm1"),
    (_VL + "attn.in_proj.weight", _qkv("layers/attn", "kernel"), LINEAR, "interleave"),
    (_VL + "attn.in_proj.bias", _qkv("layers/attn", "bias"), FLAT, "interleave"),
    (_VL + "attn.out_proj.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_VL + "attn.out_proj.bias", "layers/attn/o_proj/bias", SAME),
    *_norm(_VL + "ln_2", "layers/norm2"),
    (_VL + "mlp.c_fc.weight", "layers/mlp/fc1/kernel", LINEAR),
    (_VL + "mlp.c_fc.bias", "layers/mlp/fc1/bias", SAME),
    (_VL + "mlp.c_proj.weight", "layers/mlp/fc2/kernel", LINEAR),
    (_VL + "mlp.c_proj.bias", "layers/mlp/fc2/bias", SAME),
)
RESAMPLER = (
    (_P + "query", "query", SAME),
    (_P + "pos_embed", "pos_embed", SAME),
    (_P + "kv_proj.weight", "kv_proj/kernel", LINEAR),
    *_norm(_P + "ln_kv", "ln_kv"),
    *_norm(_P + "ln_q", "ln_q"),
    (_P + "attn.in_proj_weight", _qkv("attn", "kernel"), LINEAR, "concat"),
    (_P + "attn.in_proj_bias", _qkv("attn", "bias"), FLAT, "concat"),
    (_P + "attn.out_proj.weight", "attn/o_proj/kernel", LINEAR2),
    (_P + "attn.out_proj.bias", "attn/o_proj/bias", SAME),
    *_norm(_V + "ln_post", "ln_post"),
    (_V + "proj", "proj/kernel", SAME),
)


def keymap(model: ml_collections.ConfigDict) -> KeyMap:
    if model.vision.stem != "qwenvl" or model.connector.kind != "resampler":
        raise ConversionError(f"Qwen-VL takes the qwenvl stem and the resampler connector, got stem="
                              f"{model.vision.stem!r} connector={model.connector.kind!r}")
    return (KeyMap(VISION).prefixed("", "vision") + KeyMap(RESAMPLER).prefixed("", "connector")
            + qwen1.KEYMAP.prefixed("", "decoder"))


# Qwen-VL's visual.py hard-codes a 256-row (16 x 16) position table and LayerNorm eps 1e-6.
POS_GRID, NORM_EPS = 16, 1e-6
# `<img>` in the Qwen tokenizer (Qwen-VL's and Belle-VL's): modeling_qwen.py finds the images by
# `config.visual["image_start_id"]` (`</img>` and `<imgpad>` are the next two ids), so the config must carry it.
IMAGE_START_ID = 151857


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision,connector,text} from a Qwen-VL / Belle-VL config.json (`visual` block + Qwen1 fields)."""
    v, text = hf["visual"], qwen1.text_config(hf)
    if v["output_dim"] != text["hidden"]:
        raise ConversionError(f"visual output_dim {v['output_dim']} != LLM hidden_size {text['hidden']}")
    vision = dict(stem="qwenvl", image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                  depth=v["layers"], heads=v["heads"], mlp_dim=int(v["width"] * v["mlp_ratio"]), mlp_act="gelu",
                  norm_eps=NORM_EPS, pre_norm=True, feature_layer=-1, drop_cls=False, qkv_bias="qkv",
                  post_norm=False, pos_grid=POS_GRID)
    connector = dict(kind="resampler", num_queries=v.get("n_queries", 256), heads=v["output_dim"] // 128,
                     norm_eps=NORM_EPS)
    return dict(vision=vision, connector=connector, text=text)


def hf_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json of the Qwen-VL layout: the Qwen1 fields plus the `visual` block."""
    v, c = model.vision, model.connector
    # Qwen-VL sizes its MLP as int(width * mlp_ratio): a ratio rounded up a little survives the int().
    ratio = round(v.mlp_dim / v.width + 1e-5, 4)
    if int(v.width * ratio) != v.mlp_dim:
        raise ConversionError(f"no 4-digit mlp_ratio gives int({v.width} * ratio) = {v.mlp_dim}")
    visual = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.depth, heads=v.heads,
                  mlp_ratio=ratio, output_dim=model.text.hidden, n_queries=c.num_queries,
                  image_start_id=IMAGE_START_ID)
    return qwen1.hf_config(model.text) | dict(visual=visual)
