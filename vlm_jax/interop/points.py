"""POINTS1.5 checkpoints: the LLM in the WeLM "CustomLlama" layout (Qwen2.5 weights, docs/architectures.md 2.5)
<-> `decoder`, and (family `points`) the whole model: `vision_encoder.*` = Qwen2-VL's vision blocks (its
`merger`, if stored, is unused) <-> `vision`, `vision_projector.*` = a PatchMerger <-> `connector`
(interop/qwen2_vl.py). Family `points_qwen2` reads the same model with the LLM in Qwen2 names under `llm.`
(what SGLang's POINTS1.5 loader expects); export writes the CustomLlama layout.

`key_value_dense` interleaves k and v per KV head (rows viewed `(kv_heads, 2, head_dim)`), and
`dense_h_to_4h` is `[up; gate]` (forward `x1 * silu(x2)` with `(x1, x2) = chunk(2)`).
"""

from typing import Any

import ml_collections

from vlm_jax.interop import llama, qwen2, qwen2_vl
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


def _vision_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    return (qwen2_vl.tower_keymap(model.vision).prefixed("vision_encoder.", "vision")
            + KeyMap(qwen2_vl.MERGER_ROWS).prefixed("vision_projector.", "connector")
            + KeyMap((), ignore=(r"vision_encoder\.merger\..*",)))


def keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """The whole POINTS1.5 checkpoint (family `points`)."""
    return _vision_keymap(model) + KeyMap(ROWS).prefixed("", "decoder")


def qwen2_keymap(model: ml_collections.ConfigDict) -> KeyMap:
    """The whole POINTS1.5 checkpoint with its LLM in Qwen2 names under `llm.` (family `points_qwen2`), as
    SGLang's POINTS1.5 model loads it (`Qwen2ForCausalLM` from a Qwen2Config `llm_config`)."""
    return _vision_keymap(model) + qwen2.keymap(model.text).prefixed("llm.", "decoder")


# POINTS' CustomLlamaConfig fields (WePOINTS' `modeling_llama.py` / SGLang's copy, docs/provenance.md) with the
# class's own defaults, which is what the released code runs when config.json leaves one out; the values this
# decoder computes with where they differ from the defaults.
LLM_DEFAULTS = dict(num_kv_heads=4, hidden_act="swiglu", rotary_pct=1.0, rotary_emb_base=10000,
                    rotary_compress=1.0, layernorm_epsilon=1e-5, norm_type="layer_norm", qkv_proj_bias=True,
                    out_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True)
LLM_FIXED = dict(hidden_act="swiglu", rotary_pct=1.0, rotary_compress=1.0, norm_type="rms_norm",
                 qkv_proj_bias=True, out_proj_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False)


def hf_config(model: ml_collections.ConfigDict, stored: dict[str, Any] | None) -> dict[str, Any]:
    """POINTS' config.json: the source's (class names, remote-code map, other fields) with our `vision_config`
    and `llm_config` values. The tower's own `merger` is not written (POINTS never runs it). Every
    CustomLlamaConfig field whose class default would build another model is written out (`LLM_FIXED`)."""
    t = model.text
    qwen2_vl.check_exportable(model)
    if not t.qkv_bias or t.tie_embeddings or t.head_dim * t.heads != t.hidden or t.kv_heads >= t.heads:
        raise ConversionError("POINTS' CustomLlama has q/k/v biases, an untied head, head_dim = hidden / heads and "
                              f"fewer KV heads than heads (its key_value_dense layout); this decoder has "
                              f"qkv_bias={t.qkv_bias} tie_embeddings={t.tie_embeddings} head_dim={t.head_dim} "
                              f"kv_heads={t.kv_heads}/{t.heads}")
    out = dict(stored or {})
    out["vision_config"] = dict(out.get("vision_config") or {}) | qwen2_vl.hf_config(model)
    out["llm_config"] = dict(out.get("llm_config") or {}) | LLM_FIXED | dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden, num_layers=t.layers, num_attention_heads=t.heads,
        num_kv_heads=t.kv_heads, ffn_hidden_size=t.ffn, layernorm_epsilon=t.rms_eps, rotary_emb_base=t.rope_base,
        tie_word_embeddings=False)
    return out


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision, connector, text} from POINTS' config.json: `vision_config` (a Qwen2VLVisionConfig dict) and
    `llm_config`. The projector maps to the LLM width."""
    return qwen2_vl.model_config(hf["vision_config"]) | dict(text=text_config(hf))


def qwen2_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.{vision, connector, text} from a POINTS config.json whose `llm_config` is a Qwen2Config."""
    c = hf["llm_config"]
    if "num_layers" in c:
        raise ConversionError("this POINTS llm_config has CustomLlamaConfig fields (num_layers): import it with "
                              "--family points")
    return qwen2_vl.model_config(hf["vision_config"]) | dict(text=qwen2.text_config(c))


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.text from POINTS' `llm_config` (CustomLlamaConfig fields, docs/architectures.md 2.5), a missing field
    taking the class default; a setting this decoder does not compute (LayerNorm, partial or compressed RoPE,
    o / MLP biases, the fused non-GQA `query_key_value`) is refused."""
    c = hf.get("llm_config", hf)
    if "num_layers" not in c and "num_hidden_layers" in c:
        raise ConversionError("this POINTS llm_config has Qwen2Config fields (num_hidden_layers): import it with "
                              "--family points_qwen2")
    got = LLM_DEFAULTS | c
    if c.get("rms_norm") is not None:  # CustomLlamaConfig: rms_norm, when given, overrides norm_type
        got["norm_type"] = "rms_norm" if c["rms_norm"] else "layer_norm"
    wrong = {k: got[k] for k, v in LLM_FIXED.items() if got[k] != v}
    heads = c["num_attention_heads"]
    if got["num_kv_heads"] >= heads:
        wrong["num_kv_heads"] = got["num_kv_heads"]
    if wrong:
        raise ConversionError(f"POINTS llm_config {wrong}: this decoder computes {LLM_FIXED} with num_kv_heads < "
                              f"num_attention_heads ({heads}); a field left out takes CustomLlamaConfig's default")
    return llama.text_config(dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=heads, num_key_value_heads=got["num_kv_heads"], intermediate_size=c["ffn_hidden_size"],
        rms_norm_eps=got["layernorm_epsilon"], rope_theta=got["rotary_emb_base"], attention_bias=True),
        qkv_bias=True)
