"""LLaMA-architecture decoders (Vicuna, XVERSE-13B, Ziya-LLaMA; HF `LlamaForCausalLM`) <-> `decoder`."""

from typing import Any

import ml_collections

from vlm_jax.interop.keymap import LINEAR, LINEAR2, SAME, ConversionError, KeyMap

_L = "model.layers.{i}."

ROWS = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", SAME),
    (_L + "input_layernorm.weight", "layers/input_norm/scale", SAME),
    (_L + "self_attn.q_proj.weight", "layers/attn/q_proj/kernel", LINEAR),
    (_L + "self_attn.k_proj.weight", "layers/attn/k_proj/kernel", LINEAR),
    (_L + "self_attn.v_proj.weight", "layers/attn/v_proj/kernel", LINEAR),
    (_L + "self_attn.o_proj.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_L + "post_attention_layernorm.weight", "layers/post_attn_norm/scale", SAME),
    (_L + "mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", LINEAR),
    (_L + "mlp.up_proj.weight", "layers/mlp/up_proj/kernel", LINEAR),
    (_L + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel", LINEAR),
    ("model.norm.weight", "final_norm/scale", SAME),
)
LM_HEAD = (("lm_head.weight", "lm_head/kernel", LINEAR),)
# Older checkpoints (Vicuna .bin) store the RoPE frequencies as a buffer; we recompute them.
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def keymap(text: ml_collections.ConfigDict, extra_rows: tuple = ()) -> KeyMap:
    return KeyMap(ROWS + extra_rows + (() if text.tie_embeddings else LM_HEAD), ignore=IGNORE)


def _rope_base(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"RoPE scaling {rope} is not supported (plain rotate_half RoPE only)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def text_config(hf: dict[str, Any], qkv_bias: bool = False) -> dict[str, Any]:
    """model.text from an HF LlamaConfig-shaped dict."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key) and not (key == "attention_bias" and qkv_bias):
            raise ConversionError(f"{key}=True is not supported by the vlm_jax decoder")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r}: the decoder's MLP is SwiGLU (silu)")
    heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn=hf["intermediate_size"],
                rms_eps=hf.get("rms_norm_eps", 1e-6), rope_base=_rope_base(hf), qkv_bias=qkv_bias,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def hf_config(t: ml_collections.ConfigDict, model_type: str = "llama",
              architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
    out = dict(model_type=model_type, architectures=[architecture], vocab_size=t.vocab_size,
               hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
               num_key_value_heads=t.kv_heads, head_dim=t.head_dim, intermediate_size=t.ffn,
               rms_norm_eps=t.rms_eps, rope_theta=t.rope_base, hidden_act="silu",
               tie_word_embeddings=t.tie_embeddings)
    if model_type == "llama":
        if t.qkv_bias:
            raise ConversionError("a decoder with qkv_bias does not export as LLaMA (its bias flag is q/k/v/o)")
        out.update(attention_bias=False, mlp_bias=False)
    return out
