"""Qwen2 / Qwen2.5 decoders (HF `Qwen2ForCausalLM`): the LLaMA table plus q/k/v biases."""

from typing import Any

import ml_collections

from vlm_jax.interop import llama
from vlm_jax.interop.keymap import FLAT, ConversionError, KeyMap

_L = "model.layers.{i}."

QKV_BIAS = (
    (_L + "self_attn.q_proj.bias", "layers/attn/q_proj/bias", FLAT),
    (_L + "self_attn.k_proj.bias", "layers/attn/k_proj/bias", FLAT),
    (_L + "self_attn.v_proj.bias", "layers/attn/v_proj/bias", FLAT),
)


def keymap(text: ml_collections.ConfigDict) -> KeyMap:
    return llama.keymap(text, QKV_BIAS)


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ConversionError("use_sliding_window=True is not supported (full causal attention only)")
    return llama.text_config(hf, qkv_bias=True)


def hf_config(t: ml_collections.ConfigDict) -> dict[str, Any]:
    if not t.qkv_bias:
        raise ConversionError("Qwen2 always has q/k/v biases; this decoder has qkv_bias=False")
    return llama.hf_config(t, "qwen2", "Qwen2ForCausalLM") | dict(use_sliding_window=False)
