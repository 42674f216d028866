"""BLIP-2 / Ziya-BLIP2: HF `Blip2ForConditionalGeneration` with a LLaMA language model <-> the VLM with the
`eva` ViT, the `qformer` connector and the decoder (docs/architectures.md 3).

`vision_model.*` -> `vision` (fused `qkv` in block layout; its bias is `[q_bias; 0; v_bias]` and our ViT has no
key bias: the zero slice is dropped on import and written back as zeros), `query_tokens`, `qformer.*` and
`language_projection.*` -> `connector`, `language_model.*` -> `decoder`. The Q-Former stack is scanned in
units of k = `cross_attention_frequency` layers, so HF layer k*i + j is slot j of unit i (`{i*k+j}` rows); the
`layers % k` layers after the last whole unit are slots of the unscanned `tail`.
Family `blip2_visual` is the same without `language_model.*`: Ziya-BLIP2's released checkpoint holds only the
visual part, its LLM (Ziya-LLaMA-13B) comes separately (`convert.py import --src LLAMA_DIR --vision VISUAL_DIR
--vision_family blip2_visual`).
"""

from typing import Any

import ml_collections

from vlm_jax.interop import llama
from vlm_jax.interop.keymap import (CONV, FLAT, LINEAR, LINEAR2, SAME, UNSQUEEZE1, UNSQUEEZE2, ConversionError,
                                    KeyMap, Layout, norm_rows as _norm)

_V = "vision_model."
_VL = _V + "encoder.layers.{i}."


def _linear(torch_name: str, path: str, layout: Layout = LINEAR, bias: Layout = FLAT) -> tuple[tuple, ...]:
    return ((torch_name + ".weight", path + "/kernel", layout), (torch_name + ".bias", path + "/bias", bias))


VISION = (
    (_V + "embeddings.patch_embedding.weight", "stem/patch_embed/kernel", CONV),
    (_V + "embeddings.patch_embedding.bias", "stem/patch_embed/bias", SAME),
    (_V + "embeddings.class_embedding", "stem/cls_token", UNSQUEEZE2),
    (_V + "embeddings.position_embedding", "stem/pos_embed", UNSQUEEZE1),
    *_norm(_VL + "layer_norm1", "layers/norm1"),
    (_VL + "self_attn.qkv.weight", tuple(f"layers/attn/{x}_proj/kernel" for x in "qkv"), LINEAR, "concat"),
    (_VL + "self_attn.qkv.bias", ("layers/attn/q_proj/bias", None, "layers/attn/v_proj/bias"), FLAT, "concat"),
    *_linear(_VL + "self_attn.projection", "layers/attn/o_proj", LINEAR2, SAME),
    *_norm(_VL + "layer_norm2", "layers/norm2"),
    *_linear(_VL + "mlp.fc1", "layers/mlp/fc1", bias=SAME),
    *_linear(_VL + "mlp.fc2", "layers/mlp/fc2", bias=SAME),
    *_norm(_V + "post_layernorm", "post_norm"),
)


def _attention(torch_name: str, path: str) -> tuple[tuple, ...]:
    """A BERT attention block: query/key/value, output.dense, then output.LayerNorm (post-LN)."""
    rows = [r for name, x in (("query", "q"), ("key", "k"), ("value", "v"))
            for r in _linear(f"{torch_name}.attention.{name}", f"{path}/{x}_proj")]
    return (*rows, *_linear(torch_name + ".output.dense", path + "/o_proj", LINEAR2, SAME))


def _qformer_layer(hf: str, ours: str, cross: bool) -> tuple[tuple, ...]:
    """One HF `Blip2QFormerLayer` (names under `hf`) <-> one QFormerLayer (paths under `ours`)."""
    rows = [*_attention(hf + "attention", ours + "attn"),
            *_norm(hf + "attention.output.LayerNorm", ours + "attn_norm")]
    if cross:
        rows += [*_attention(hf + "crossattention", ours + "cross_attn"),
                 *_norm(hf + "crossattention.output.LayerNorm", ours + "cross_norm")]
    return (*rows, *_linear(hf + "intermediate_query.dense", ours + "mlp/fc1", bias=SAME),
            *_linear(hf + "output_query.dense", ours + "mlp/fc2", bias=SAME),
            *_norm(hf + "output_query.LayerNorm", ours + "mlp_norm"))


def qformer_rows(layers: int, frequency: int) -> tuple[tuple, ...]:
    """Queries, input norm, projection, then the layers as vlm_jax.qformer.QFormer lays them out."""
    rows = [("query_tokens", "query_tokens", UNSQUEEZE1), *_norm("qformer.layernorm", "in_norm"),
            *_linear("language_projection", "projection", bias=SAME)]
    units, rest = divmod(layers, frequency)
    if units:
        for j in range(frequency):
            rows += _qformer_layer(f"qformer.encoder.layer.{{i*{frequency}+{j}}}.", f"layers/layer_{j}/", j == 0)
    for j in range(rest):
        rows += _qformer_layer(f"qformer.encoder.layer.{units * frequency + j}.", f"tail/layer_{j}/", j == 0)
    return tuple(rows)


# The Q-Former's text branch (BERT FFN, embeddings) never runs on query-only input; older checkpoints carry it.
IGNORE = (r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*", r"qformer\.embeddings\..*")


def visual_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """ViT, queries, Q-Former and projection (`vision` and `connector`)."""
    _check(model)
    q = model.connector
    return (KeyMap(VISION, hf_layers=(("layers", model.vision.depth),)).prefixed("", "vision")
            + KeyMap(qformer_rows(q.layers, q.cross_attention_frequency), ignore=IGNORE).prefixed("", "connector"))


def keymap(model: ml_collections.ConfigDict) -> KeyMap:
    return visual_keymap(model) + llama.keymap(model.text).prefixed("language_model.", "decoder")


def _check(model: ml_collections.ConfigDict) -> None:
    v = model.vision
    problems = [f"{k}={v[k]!r} (BLIP-2: {want!r})" for k, want in
                (("stem", "eva"), ("pre_norm", False), ("qkv_bias", "qv"), ("post_norm", True), ("mlp_act", "gelu"),
                 ("feature_layer", -1), ("drop_cls", False)) if v[k] != want]
    if model.connector.kind != "qformer":
        problems.append(f"connector kind={model.connector.kind!r} (BLIP-2: 'qformer')")
    if problems:
        raise ConversionError("this model is not BLIP-2-shaped: " + "; ".join(problems))


def visual_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision,connector} from an HF Blip2Config dict."""
    v, q = hf["vision_config"], hf["qformer_config"]
    if not v.get("qkv_bias", True):
        raise ConversionError("Blip2VisionConfig qkv_bias=False is not supported (EVA ViT-g has q/v biases)")
    for name, act in (("vision", v.get("hidden_act", "gelu")), ("qformer", q.get("hidden_act", "gelu"))):
        if act != "gelu":
            raise ConversionError(f"BLIP-2 {name} hidden_act {act!r}: only exact gelu is supported")
    frequency = q.get("cross_attention_frequency", 2)
    if frequency < 1:
        raise ConversionError(f"Blip2QFormerConfig cross_attention_frequency {frequency}: must be at least 1")
    vision = dict(stem="eva", image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                  width=v.get("hidden_size", 1408), depth=v.get("num_hidden_layers", 39),
                  heads=v.get("num_attention_heads", 16), mlp_dim=v.get("intermediate_size", 6144), mlp_act="gelu",
                  norm_eps=v.get("layer_norm_eps", 1e-6), pre_norm=False, feature_layer=-1, drop_cls=False,
                  qkv_bias="qv", post_norm=True)
    connector = dict(kind="qformer", num_queries=hf.get("num_query_tokens", 32), width=q.get("hidden_size", 768),
                     layers=q.get("num_hidden_layers", 12), heads=q.get("num_attention_heads", 12),
                     mlp_dim=q.get("intermediate_size", 3072),
                     cross_attention_frequency=frequency,
                     norm_eps=q.get("layer_norm_eps", 1e-12))
    return dict(vision=vision, connector=connector)


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision,connector,text} from an HF Blip2Config dict (LLaMA text config)."""
    text = hf["text_config"]
    if text.get("model_type", "llama") != "llama":
        raise ConversionError(f"BLIP-2 language model {text.get('model_type')!r}: only LLaMA is supported")
    return visual_model_config(hf) | dict(text=llama.text_config(text))


def hf_config(model: ml_collections.ConfigDict, image_token_index: int) -> dict[str, Any]:
    """config.json of Blip2ForConditionalGeneration; the LLaMA text config refuses a decoder with qkv bias."""
    _check(model)
    v, q = model.vision, model.connector
    vision = dict(model_type="blip_2_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                  num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act="gelu", layer_norm_eps=v.norm_eps, qkv_bias=True)
    qformer = dict(model_type="blip_2_qformer", hidden_size=q.width, num_hidden_layers=q.layers,
                   num_attention_heads=q.heads, intermediate_size=q.mlp_dim, hidden_act="gelu",
                   layer_norm_eps=q.norm_eps, cross_attention_frequency=q.cross_attention_frequency,
                   encoder_hidden_size=v.width, use_qformer_text_input=False)
    return dict(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"], vision_config=vision,
                qformer_config=qformer, text_config=llama.hf_config(model.text), num_query_tokens=q.num_queries,
                image_token_index=image_token_index, use_decoder_only_language_model=True)
