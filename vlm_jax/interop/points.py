"""POINTS1.5 checkpoints: the LLM in the WeLM "CustomLlama" layout (Qwen2.5 weights, docs/architectures.md 2.5)
<-> `decoder`, and (family `points`) the whole model: `vision_encoder.*` = Qwen2-VL's vision blocks (its
`merger`, if stored, is unused) <-> `vision`, `vision_projector.*` = a PatchMerger <-> `connector`
(interop/qwen2_vl.py).

`key_value_dense` interleaves k and v per KV head (rows viewed `(kv_heads, 2, head_dim)`), and
`dense_h_to_4h` is `[up; gate]` (forward `x1 * silu(x2)` with `(x1, x2) = chunk(2)`).
"""

from typing import Any

import ml_collections

from vlm_jax.interop import llama, qwen2_vl
from vlm_jax.interop.keymap import FLAT, LINEAR, LINEAR2, SAME, ConversionError, KeyMap

_L = "llm.lm.layers.{i}."

ROWS = (
    ("llm.lm.embed_in.weight", "embed_tokens/embedding", SAME),
    (_L + "input_layernorm.weight", "layers/input_norm/scale", SAME),
    (_L + "attention.query_dense.weight", "layers/attn/q_proj/kernel", LINEAR),
    (_L + "attention.query_dense.bias", "layers/attn/q_proj/bias", FLAT),
    (_L + "attention.key_value_dense.weight", ("layers/attn/k_proj/kernel", "layers/attn/v_proj/kernel"), LINEAR,
     "interleave"),
    (_L + "attention.key_value_dense.bias", ("layers/attn/k_proj/bias", "layers/attn/v_proj/bias"), FLAT,
     "interleave"),
    (_L + "attention.dense.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_L + "post_attention_layernorm.weight", "layers/post_attn_norm/scale", SAME),
    (_L + "mlp.dense_h_to_4h.weight", ("layers/mlp/up_proj/kernel", "layers/mlp/gate_proj/kernel"), LINEAR, "concat"),
    (_L + "mlp.dense_4h_to_h.weight", "layers/mlp/down_proj/kernel", LINEAR),
    ("llm.lm.final_layer_norm.weight", "final_norm/scale", SAME),
    ("llm.embed_out.weight", "lm_head/kernel", LINEAR),
)
# points_llm takes the LLM alone.
KEYMAP = KeyMap(ROWS, ignore=(r"vision_encoder\..*", r"vision_projector\..*"))


def keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """The whole POINTS1.5 checkpoint (family `points`)."""
    return (qwen2_vl.tower_keymap(model.vision).prefixed("vision_encoder.", "vision")
            + KeyMap(qwen2_vl.MERGER_ROWS).prefixed("vision_projector.", "connector")
            + KeyMap(ROWS, ignore=(r"vision_encoder\.merger\..*",)).prefixed("", "decoder"))


def hf_config(model: ml_collections.ConfigDict, stored: dict[str, Any] | None) -> dict[str, Any]:
    """POINTS' config.json: the source's (class names, remote-code map, other fields) with our `vision_config`
    and `llm_config` values. The tower's own `merger` is not written (POINTS never runs it)."""
    t = model.text
    qwen2_vl.check_exportable(model)
    if not t.qkv_bias or t.tie_embeddings or t.head_dim * t.heads != t.hidden:
        raise ConversionError("POINTS' CustomLlama has q/k/v biases, an untied head and head_dim = hidden / heads; "
                              f"this decoder has qkv_bias={t.qkv_bias} tie_embeddings={t.tie_embeddings} "
                              f"head_dim={t.head_dim}")
    out = dict(stored or {})
    out["vision_config"] = dict(out.get("vision_config") or {}) | qwen2_vl.hf_config(model)
    out["llm_config"] = dict(out.get("llm_config") or {}) | dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden, num_layers=t.layers, num_attention_heads=t.heads,
        num_kv_heads=t.kv_heads, ffn_hidden_size=t.ffn, layernorm_epsilon=t.rms_eps, rotary_emb_base=t.rope_base)
    return out


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision, connector, text} from POINTS' config.json: `vision_config` (a Qwen2VLVisionConfig dict, unverified
    until read from the released file) and `llm_config`. The projector maps to the LLM width."""
    return qwen2_vl.model_config(hf["vision_config"]) | dict(text=text_config(hf))


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.text from POINTS' `llm_config` (WeLM field names, docs/architectures.md 2.5; unverified until read from the
    released config: num_kv_heads, rotary_emb_base)."""
    c = hf.get("llm_config", hf)
    heads = c["num_attention_heads"]
    return llama.text_config(dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=heads, num_key_value_heads=c.get("num_kv_heads", heads),
        intermediate_size=c["ffn_hidden_size"], rms_norm_eps=c.get("layernorm_epsilon", 1e-5),
        rope_theta=c.get("rotary_emb_base", 1e6), attention_bias=True), qkv_bias=True)
