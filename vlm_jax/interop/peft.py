"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> the decoder's
LoRA leaves, through the same per-family key maps as the full weights.

For every key-map row `X.weight <-> .../kernel` whose module carries an adapter, PEFT stores
`base_model.model.X.lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank]. `lora_a` [*in, rank] has
the kernel's input axes, so it converts with the kernel's own layout; `lora_b` [rank, *out] is a plain
LINEAR (one input axis, the rank). Names are those of the module tree PEFT wraps: `LlamaForCausalLM` /
`Qwen2ForCausalLM` for a decoder checkpoint, `LlavaForConditionalGeneration` (transformers >= 4.52
in-memory names, `model.language_model.*`) for a whole VLM.
"""

import json
import os
import re
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.interop import families, llava
from vlm_jax.interop.keymap import LINEAR, ConversionError, KeyMap, expand, torch_tensors
from vlm_jax.interop.torch_files import write_safetensors
from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _text_rows(model: ml_collections.ConfigDict, parts: tuple[str, ...]) -> tuple[tuple, ...]:
    """The decoder's key-map rows named as in the module tree PEFT wraps."""
    text = families.get(llava.text_family(model.text)).keymap(model)
    if parts == ("decoder",):
        return text.rows
    if "decoder" not in parts:
        raise ConversionError(f"a PEFT adapter needs a decoder; the checkpoint holds {list(parts)}")
    return tuple((("model.language_model." + r[0].removeprefix("model.")) if r[0].startswith("model.") else r[0],
                  *r[1:]) for r in text.rows)


def adapter_keymap(model: ml_collections.ConfigDict, parts: tuple[str, ...], lora_paths: set[str]) -> KeyMap:
    """Rows for exactly the adapters in `lora_paths` (vlm_jax leaf paths); any adapter outside the decoder's
    linear layers is an error naming it."""
    rows = []
    for row in _text_rows(model, parts):
        name, layout = row[0], row[2]
        paths = (row[1],) if isinstance(row[1], str) else tuple(row[1])
        modules = [p.removesuffix("kernel") for p in paths if p.endswith("/kernel")]
        if not any(m + LORA_A in lora_paths for m in modules):
            continue
        if len(paths) > 1 or len(row) > 3 and row[3] or layout.kind != "linear":
            raise ConversionError(f"{modules}: PEFT adapters on fused or non-linear tensors ({name}) are not supported")
        torch_module = PREFIX + name.removesuffix(".weight")
        rows += [(torch_module + ".lora_A.weight", modules[0] + LORA_A, layout),
                 (torch_module + ".lora_B.weight", modules[0] + LORA_B, LINEAR)]
    claimed = {r[1] for r in rows}
    stray = sorted(lora_paths - claimed)
    if stray:
        raise ConversionError(f"PEFT export covers the decoder's linear layers only; no PEFT name for {stray}")
    return KeyMap(tuple(rows))


def _target_regex(tensor_names: list[str]) -> str:
    """A PEFT `target_modules` regex matching exactly the adapted modules (layer index generalised)."""
    modules = sorted({re.sub(r"\.\d+\.", r".\\d+.", re.escape(n.removeprefix(PREFIX).rsplit(".lora_", 1)[0]))
                      for n in tensor_names})
    return "^(" + "|".join(modules) + ")$"


def adapter_tensors(model: ml_collections.ConfigDict, parts: tuple[str, ...], params: dict,
                    dtype: np.dtype) -> list[tuple[str, np.ndarray]]:
    """(PEFT name, array) of every adapter in flat `params` (path -> array)."""
    lora = {k: v for k, v in params.items() if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}
    if not lora:
        raise ConversionError("the checkpoint has no LoRA adapters (model.lora.rank is 0)")
    tensors, fillers = expand(adapter_keymap(model, parts, set(lora)), {k: v.shape for k, v in lora.items()})

    def leaf(path: str, layer: int | None) -> np.ndarray:
        x = np.asarray(lora[path])
        return (x if layer is None else x[layer]).astype(dtype)

    return list(torch_tensors(tensors, fillers, leaf, dtype))


def adapter_config(spec: LoraSpec, tensor_names: list[str], base: str = "") -> dict[str, Any]:
    return dict(peft_type="LORA", task_type="CAUSAL_LM", r=spec.rank, lora_alpha=spec.alpha,
                lora_dropout=spec.dropout, target_modules=_target_regex(tensor_names), bias="none",
                fan_in_fan_out=False, inference_mode=True, modules_to_save=None, use_rslora=False,
                use_dora=False, init_lora_weights=True, base_model_name_or_path=base)


def write_adapter(dst: str, model: ml_collections.ConfigDict, parts: tuple[str, ...], params: dict,
                  dtype: np.dtype, base: str = "") -> None:
    """Writes the adapter directory `dst` (created here) from flat `params`."""
    spec = LoraSpec.from_config(model.get("lora"))
    if spec is None:
        raise ConversionError("the checkpoint's model.lora.rank is 0: there is no adapter to export")
    tensors = adapter_tensors(model, parts, params, dtype)
    os.makedirs(dst)
    # One file, as PEFT reads it (adapters are small next to the model).
    write_safetensors(dst, iter(tensors), shard_bytes=1 << 62, prefix=WEIGHTS_FILE.removesuffix(".safetensors"))
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(spec, [n for n, _ in tensors], base), f, indent=2)
