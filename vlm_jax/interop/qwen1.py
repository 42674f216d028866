"""Qwen1 decoders (Qwen-7B/14B remote code `QWenLMHeadModel`, Belle-VL's Qwen-14B; docs/architectures.md 4.3) <->
`decoder`.

The computation is Qwen2's with kv heads = heads: q/k/v biases, no o_proj bias, SwiGLU, RMSNorm, rotate_half
RoPE. Only the names differ: `c_attn` is `[Wq; Wk; Wv]` in block layout (bias likewise), and the MLP is
`c_proj(w1(x) * silu(w2(x)))`, so w1 = up and w2 = gate. Qwen's inference-only dynamic NTK and logn scaling
change nothing up to `seq_length` (2048) and are not modelled. Exported, the decoder is a `Qwen2ForCausalLM`
(`convert.py export --format hf`) and, inside a Qwen-VL / Belle-VL model, in these names (interop/qwen_vl.py).
"""

from typing import Any

import ml_collections

from vlm_jax.interop import llama
from vlm_jax.interop.keymap import FLAT, LINEAR, LINEAR2, SAME, ConversionError, KeyMap

_L = "transformer.h.{i}."
_QKV = ("q", "k", "v")

ROWS = (
    ("transformer.wte.weight", "embed_tokens/embedding", SAME),
    (_L + "ln_1.weight", "layers/input_norm/scale", SAME),
    (_L + "attn.c_attn.weight", tuple(f"layers/attn/{x}_proj/kernel" for x in _QKV), LINEAR, "concat"),
    (_L + "attn.c_attn.bias", tuple(f"layers/attn/{x}_proj/bias" for x in _QKV), FLAT, "concat"),
    (_L + "attn.c_proj.weight", "layers/attn/o_proj/kernel", LINEAR2),
    (_L + "ln_2.weight", "layers/post_attn_norm/scale", SAME),
    (_L + "mlp.w1.weight", "layers/mlp/up_proj/kernel", LINEAR),
    (_L + "mlp.w2.weight", "layers/mlp/gate_proj/kernel", LINEAR),
    (_L + "mlp.c_proj.weight", "layers/mlp/down_proj/kernel", LINEAR),
    ("transformer.ln_f.weight", "final_norm/scale", SAME),
    ("lm_head.weight", "lm_head/kernel", LINEAR),
)
# Qwen-VL / Belle-VL checkpoints also hold the visual tower; this table takes the LLM.
IGNORE = (r"transformer\.visual\..*", r"transformer\.rotary_emb\.inv_freq")

KEYMAP = KeyMap(ROWS, ignore=IGNORE)


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """model.text from a Qwen1 config.json (`intermediate_size` there is twice each of w1 / w2)."""
    if hf.get("rotary_pct", 1.0) != 1.0:
        raise ConversionError(f"rotary_pct {hf['rotary_pct']}: only full-width RoPE is supported")
    heads = hf["num_attention_heads"]
    return llama.text_config(dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"] // 2, rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        rope_theta=hf.get("rotary_emb_base", 10000.0), attention_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", False)), qkv_bias=True)


def hf_config(t: ml_collections.ConfigDict) -> dict[str, Any]:
    """The Qwen1 config.json fields of a decoder (kv heads = heads, q/k/v biases, untied)."""
    if t.kv_heads != t.heads or not t.qkv_bias or t.tie_embeddings:
        raise ConversionError(f"Qwen1 has kv heads = heads, q/k/v biases and an untied head; this decoder has "
                              f"kv_heads={t.kv_heads}/{t.heads} qkv_bias={t.qkv_bias} tie={t.tie_embeddings}")
    return dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=t.vocab_size,
                hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                kv_channels=t.head_dim, intermediate_size=2 * t.ffn, layer_norm_epsilon=t.rms_eps,
                rotary_emb_base=t.rope_base, rotary_pct=1.0, no_bias=True, tie_word_embeddings=False)
