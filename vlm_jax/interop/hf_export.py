"""Export: a vlm_jax checkpoint directory (vlm_jax/interop/ckpt_dir.py) or a training workdir[@step] -> an
HF directory (`config.json`, sharded safetensors, tokenizer files), the original LLaVA layout, or a PEFT
adapter (vlm_jax/interop/peft.py), or the XVERSE-V adapter file (vlm_jax/interop/xverse_v.py). LoRA adapters
are merged into their kernels for `hf` and `original`.

Tensors are produced one at a time from the sharded parameters through the same key maps the import uses,
and written one shard at a time.
"""

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlm_jax.interop import blip2, clip, families, llava, peft, points, qwen2_vl, qwen_vl, xverse_v
from vlm_jax.interop.ckpt_dir import load_params
from vlm_jax.interop.keymap import ConversionError, KeyMap, expand, torch_tensors
from vlm_jax.interop.model_params import flat, unflat
from vlm_jax.interop.torch_files import write_safetensors
from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec, merge_lora

FORMATS = ("hf", "original", "peft", "xverse_v")
_RENAMED_KEYS = ("rope_parameters", "rope_scaling", "torch_dtype", "_name_or_path")


def _merge(stored: dict[str, Any] | None, ours: dict[str, Any]) -> dict[str, Any]:
    """Our values over the source's config.json (keeping fields we do not model: token ids, max positions),
    when the source was the same kind of model."""
    if not stored or stored.get("model_type") != ours.get("model_type"):
        return ours
    out = {k: v for k, v in stored.items() if k not in _RENAMED_KEYS}
    for k, v in ours.items():
        out[k] = _merge(stored.get(k), v) if isinstance(v, dict) and "model_type" in v else v
    return out


def _hf_target(model: ml_collections.ConfigDict, parts: tuple[str, ...], meta: dict[str, Any],
               image_token_index: int | None) -> tuple[str, KeyMap, dict[str, Any]]:
    """(family, key map, config.json) of the HF class these parts export to."""
    if parts == ("vision",):
        return "clip", families.get("clip").keymap(model), _merge(meta.get("hf_config"), clip.hf_config(model.vision))
    if parts == ("connector", "vision") and model.vision.stem == "navit":
        return ("qwen2_vl_vision", families.get("qwen2_vl_vision").keymap(model),
                _merge(meta.get("hf_config"), qwen2_vl.hf_config(model)))
    if parts == ("decoder",):
        name = llava.text_family(model.text)
        module = llava.TEXT_FAMILIES[name]
        return name, families.get(name).keymap(model), _merge(meta.get("hf_config"), module.hf_config(model.text))
    if parts == ("connector", "decoder", "vision") and model.vision.stem == "navit" and \
            model.text.get("rope_kind", "1d") == "1d":  # POINTS1.5: NaViT + PatchMerger + a 1-D RoPE LLM
        stored = meta.get("hf_config") if meta.get("family") == "points" else None
        return "points", points.keymap(model), points.hf_config(model, stored)
    if parts == ("connector", "decoder", "vision") and model.vision.stem == "navit":
        stored = meta.get("hf_config") if meta.get("family") == "qwen2_vl" else None
        token = image_token_index if image_token_index is not None else (stored or {}).get("image_token_id", 151655)
        return "qwen2_vl", qwen2_vl.whole_keymap(model), _merge(stored, qwen2_vl.whole_hf_config(model, token))
    if parts == ("connector", "decoder", "vision") and model.connector.kind == "resampler":  # Qwen-VL layout
        stored = meta.get("hf_config") if meta.get("family") == "qwen_vl" else None
        return "qwen_vl", families.get("qwen_vl").keymap(model), _merge(stored, qwen_vl.hf_config(model))
    if parts == ("connector", "decoder", "vision"):
        family, module = ("blip2", blip2) if model.connector.kind == "qformer" else ("llava", llava)
        stored = meta.get("hf_config") if meta.get("family") == family else None
        if image_token_index is None:
            image_token_index = (stored or {}).get("image_token_index") or model.text.vocab_size
        config = _merge(stored, module.hf_config(model, image_token_index))
        config["text_config"]["vocab_size"] = max(model.text.vocab_size, image_token_index + 1)
        return family, families.get(family).keymap(model), config
    raise ConversionError(f"parts {list(parts)} do not make an HF model: export a vision tower, a decoder, or "
                          "a whole VLM (import the original LLaVA layout with --vision to get one)")


def _gather(x: jax.Array) -> np.ndarray:
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def _stream(keymap: KeyMap, params: dict[str, jax.Array], dtype: np.dtype,
            pad_rows: dict[str, int]) -> Iterator[tuple[str, np.ndarray]]:
    tensors, fillers = expand(keymap, {k: v.shape for k, v in params.items()})

    def leaf(path: str, layer: int | None) -> np.ndarray:
        x = params[path]
        return _gather(x if layer is None else x[layer]).astype(dtype)

    for name, t in torch_tensors(tensors, fillers, leaf, dtype):
        if name in pad_rows and pad_rows[name] > t.shape[0]:
            # HF LLaVA needs an embedding row for its image token; a native model keeps it out of vocab.
            t = np.concatenate([t, np.zeros((pad_rows[name] - t.shape[0], *t.shape[1:]), t.dtype)])
        yield name, t


def _write(dst: str, keymap: KeyMap, params: dict, dtype: np.dtype, config: dict[str, Any],
           shard_bytes: int, pad_rows: dict[str, int] | None = None) -> None:
    stream = _stream(keymap, params, dtype, pad_rows or {})
    if jax.process_index() != 0:
        for _ in stream:  # every process takes part in the gathers; process 0 writes
            pass
        return
    os.makedirs(dst, exist_ok=True)
    write_safetensors(dst, stream, shard_bytes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config | {"dtype": str(dtype)}, f, indent=2)


def export_checkpoint(src: str, dst: str, fmt: str, mesh: Mesh, *, dtype: str | None = None,
                      shard_bytes: int = 5 << 30, image_token_index: int | None = None) -> None:
    """Writes `dst` in `fmt` (see FORMATS); nothing is left at `dst` unless the export succeeds."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; choose a new destination")
    params, meta = load_params(src, mesh)
    model, parts = ml_collections.ConfigDict(meta["model"]), tuple(sorted(meta["parts"]))
    np_dtype = np.dtype(dtype or model.param_dtype)
    lora = LoraSpec.from_config(model.get("lora"))
    if lora is not None and fmt in ("hf", "original"):  # these hold the merged weights
        params = flat(merge_lora(unflat(params), lora))
    tmp = f"{dst.rstrip('/')}.partial-{os.getpid()}"
    try:
        if fmt == "peft":
            base = (meta.get("hf_config") or {}).get("_name_or_path", "")
            adapters = {k: _gather(v) for k, v in params.items() if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}
            if jax.process_index() == 0:
                peft.write_adapter(tmp, model, parts, adapters, np_dtype, base)
        elif fmt == "xverse_v":
            adapters = {k: _gather(v) for k, v in params.items()
                        if k.startswith("connector/") or k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}
            if jax.process_index() == 0:
                xverse_v.export_adapter(tmp, model, adapters, np_dtype)
        elif fmt == "hf":
            family, keymap, config = _hf_target(model, parts, meta, image_token_index)
            vocab = config.get("text_config", {}).get("vocab_size", 0)
            pad = {"language_model.model.embed_tokens.weight": vocab, "language_model.lm_head.weight": vocab}
            _write(tmp, keymap, params, np_dtype, config, shard_bytes, pad)
        else:
            if not {"connector", "decoder"} <= set(parts):
                raise ConversionError(f"the original LLaVA layout needs a connector and a decoder; {src} has {parts}")
            tower = (meta.get("hf_config") or {}).get("mm_vision_tower", "")
            if "vision" in parts:
                tower = os.path.join(os.path.abspath(dst), "vision_tower")
                _write(os.path.join(tmp, "vision_tower"), families.get("clip").keymap(model),
                       {k: v for k, v in params.items() if k.startswith("vision/")}, np_dtype,
                       _merge(meta.get("vision_hf_config"), clip.hf_config(model.vision)), shard_bytes)
            llm = {k: v for k, v in params.items() if not k.startswith("vision/")}
            stored = meta.get("hf_config") if meta.get("family") == "llava_original" else None
            _write(tmp, llava.original_keymap(model), llm, np_dtype,
                   _merge(stored, llava.original_hf_config(model, tower)), shard_bytes)
        if jax.process_index() == 0:
            tokenizer = os.path.join(src, "tokenizer")
            if os.path.isdir(tokenizer):
                for name in os.listdir(tokenizer):
                    shutil.copy(os.path.join(tokenizer, name), os.path.join(tmp, name))
            os.replace(tmp, dst)
    finally:
        if jax.process_index() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)

