"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> the decoder's
LoRA leaves, through the same per-family key maps as the full weights. Export: `write_adapter`; import onto a
base checkpoint directory: `import_adapter`.

For every key-map row `X.weight <-> .../kernel` whose module carries an adapter, PEFT stores
`base_model.model.X.lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank]. `lora_a` [*in, rank] has
the kernel's input axes, so it converts with the kernel's own layout; `lora_b` [rank, *out] is a plain
LINEAR (one input axis, the rank). Names are those of the module tree PEFT wraps: `LlamaForCausalLM` /
`Qwen2ForCausalLM` for a decoder checkpoint, `LlavaForConditionalGeneration` (transformers >= 4.52
in-memory names, `model.language_model.*`) for a whole VLM.

Parameters a run trained outside LoRA (meta `trained`: a workdir's trained.json, written by the trainer from
optim.trainable; the LLaVA connector of an XVERSE-V-style stage 2) go into the adapter as PEFT's
`modules_to_save`: adapter_config.json lists the torch modules holding them (each module whole), and the
adapter file holds their tensors as PEFT saves them, `base_model.model.<module>.<param>` (in memory PEFT keeps
them as `<module>.modules_to_save.default.<param>`). Module names exist for a decoder checkpoint and a LLaVA
model; another layout with such parameters is refused rather than exported without them.
"""

import json
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.checkpoints.directory import RECORD_DIR, load_params, write_checkpoint_dir
from vlm_jax.config import upgrade_model_config
from vlm_jax.data.tokenizer import record_root
from vlm_jax.interop import families, llava
from vlm_jax.interop.keymap import (LINEAR, ConversionError, KeyMap, Tensor, build_leaf, expand, leaf_sources,
                                    match_source,
                                    torch_tensors)
from vlm_jax.interop.torch_files import TorchFiles, write_safetensors
from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec
from vlm_jax.params import abstract_params, param_shardings

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


# The legacy LLaVA names of llava.hf_keymap -> the module tree transformers (>= 4.52) builds, which PEFT wraps:
# llava.HF_NEW_TO_LEGACY's prefix renames, reversed.
_LLAVA_IN_MEMORY = tuple((legacy, re.sub(r"\\(.)", r"\1", new.removeprefix("^")))
                         for new, legacy in llava.HF_NEW_TO_LEGACY)


def _in_memory(name: str) -> str:
    for old, new in _LLAVA_IN_MEMORY:
        if name.startswith(old):
            return new + name.removeprefix(old)
    raise ConversionError(f"no in-memory LLaVA name for {name}")


def _module_keymap(model: ml_collections.ConfigDict, parts: tuple[str, ...]) -> KeyMap:
    """Every full-weight row named as in the module tree PEFT wraps (for modules_to_save)."""
    if parts == ("decoder",):
        return KeyMap(families.get(llava.text_family(model.text)).keymap(model).rows)
    if parts == ("connector", "decoder", "vision") and model.vision.stem == "clip" and model.connector.kind == "mlp":
        return KeyMap(tuple((_in_memory(r[0]), *r[1:]) for r in llava.hf_keymap(model).rows))
    raise ConversionError(f"PEFT modules_to_save: no torch module names for this model's layout (parts "
                          f"{list(parts)}, vision stem {model.vision.stem!r}, connector {model.connector.kind!r}); "
                          "a decoder or a LLaVA model has them (or export --format hf, merged)")


def _module(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def _in_modules(name: str, modules: list[str]) -> bool:
    """Whether tensor `name` lies in a module PEFT wraps for `modules` (a module whose name ends with one)."""
    parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
    return any(p.endswith(m) for p in parents for m in modules)


def module_tensors(model: ml_collections.ConfigDict, parts: tuple[str, ...], shapes: dict[str, tuple[int, ...]],
                   modules: list[str]) -> list[Tensor]:
    """The torch tensors of `modules` (PEFT's modules_to_save) in a checkpoint whose full-weight leaves have
    `shapes`."""
    if not modules:
        return []
    tensors, _ = expand(_module_keymap(model, parts), shapes)
    return [t for t in tensors if _in_modules(t.name, modules)]


def saved_tensors(model: ml_collections.ConfigDict, parts: tuple[str, ...], shapes: dict[str, tuple[int, ...]],
                  trained: set[str]) -> tuple[list[str], list[Tensor]]:
    """(modules_to_save, their torch tensors) for the full-weight leaves `trained` of a checkpoint whose
    full-weight leaves have `shapes`: every module holding a trained tensor, whole."""
    tensors, _ = expand(_module_keymap(model, parts), shapes)
    modules = sorted({_module(t.name) for t in tensors if any(p in trained for p, _ in t.pieces)})
    return modules, module_tensors(model, parts, shapes, modules)


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


def adapter_config(spec: LoraSpec, tensor_names: list[str], base: str = "",
                   modules_to_save: list[str] | None = None) -> dict[str, Any]:
    return dict(peft_type="LORA", task_type="CAUSAL_LM", r=spec.rank, lora_alpha=spec.alpha,
                lora_dropout=spec.dropout, target_modules=_target_regex(tensor_names), bias="none",
                fan_in_fan_out=False, inference_mode=True, modules_to_save=modules_to_save or None,
                use_rslora=False, use_dora=False, init_lora_weights=True, base_model_name_or_path=base)


def write_adapter(dst: str, model: ml_collections.ConfigDict, parts: tuple[str, ...], params: dict,
                  dtype: np.dtype, base: str = "", modules_to_save: list[str] | None = None,
                  saved: list[Tensor] | None = None) -> None:
    """Writes the adapter directory `dst` (created here) from flat `params` (path -> array): its LoRA leaves, and
    the leaves of the tensors `saved` of `modules_to_save` (`saved_tensors`)."""
    spec = LoraSpec.from_config(model.lora)
    if spec is None:
        raise ConversionError("the checkpoint's model.lora.rank is 0: there is no adapter to export")
    tensors = adapter_tensors(model, parts, params, dtype)
    names = [n for n, _ in tensors]

    def leaf(path: str, layer: int | None) -> np.ndarray:
        x = np.asarray(params[path])
        return (x if layer is None else x[layer]).astype(dtype)

    tensors += [(PREFIX + n, x) for n, x in torch_tensors(saved or [], [], leaf, dtype)]
    os.makedirs(dst)
    # One file, as PEFT reads it (adapters are small next to the model).
    write_safetensors(dst, {n: (x.shape, x.dtype) for n, x in tensors}, tensors, shard_bytes=1 << 62,
                      prefix=WEIGHTS_FILE.removesuffix(".safetensors"))
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(spec, names, base, modules_to_save), f, indent=2)


def read_adapter_config(src: str) -> dict[str, Any]:
    file = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ConversionError(f"{src} is not a PEFT adapter directory (no {CONFIG_FILE})")
    with open(file) as f:
        config = json.load(f)
    unsupported = {k: config.get(k) for k, ok in (("peft_type", "LORA"), ("bias", "none"), ("use_rslora", False),
                                                  ("use_dora", False), ("fan_in_fan_out", False))
                   if config.get(k, ok) != ok}
    if unsupported:
        raise ConversionError(f"{file}: unsupported LoRA settings {unsupported}")
    return config


def adapted_modules(model: ml_collections.ConfigDict, parts: tuple[str, ...], names: list[str],
                     where: str) -> set[str]:
    """vlm_jax module paths (`decoder/layers/attn/q_proj`) of the adapter's lora_A tensors."""
    patterns = []
    for row in _text_rows(model, parts):
        paths = (row[1],) if isinstance(row[1], str) else tuple(row[1])
        if len(paths) == 1 and paths[0].endswith("/kernel") and row[2].kind == "linear":
            torch_module = re.escape(PREFIX + row[0].removesuffix(".weight")).replace(r"\{i\}", r"\d+")
            patterns.append((re.compile(torch_module + r"\.lora_A\.weight"), paths[0].removesuffix("/kernel")))
    found, unknown = set(), []
    for name in names:
        if name.endswith(".lora_A.weight"):
            hit = [m for regex, m in patterns if regex.fullmatch(name)]
            if hit:
                found.add(hit[0])
            else:
                unknown.append(name)
    if unknown or not found:
        raise ConversionError(f"{where}: no decoder linear layer for adapter tensor(s) {unknown or names[:5]}")
    return found


def import_adapter(src: str, base: str, dst: str, mesh: Mesh) -> ml_collections.ConfigDict:
    """Writes the checkpoint directory `dst`: the base checkpoint (directory or workdir) plus the PEFT adapter
    at `src`, with model.lora set from adapter_config.json. Returns the model config."""
    config = read_adapter_config(src)
    params, meta = load_params(base, mesh)
    model, parts = upgrade_model_config(meta["model"]), tuple(sorted(meta["parts"]))
    if LoraSpec.from_config(model.lora) is not None:
        raise ConversionError(f"{base} already has LoRA adapters; import onto a base model")
    files = TorchFiles(src)
    shapes = {k: v for k, v in files.shapes().items() if ".lora_" in k}
    saved = module_tensors(model, parts, {k: v.shape for k, v in params.items()},
                           config.get("modules_to_save") or [])
    saved_names = {PREFIX + t.name: t for t in saved}
    missing = sorted(set(saved_names) - set(files.shapes()))
    unexpected = sorted(set(files.shapes()) - set(shapes) - set(saved_names))
    if missing or unexpected:
        raise ConversionError(f"{src}: the modules_to_save {config.get('modules_to_save')} lack tensors "
                              f"{missing}; tensors neither LoRA nor in them: {unexpected}")
    modules = adapted_modules(model, parts, sorted(shapes), src)
    model.lora.update(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
        targets="(" + "|".join(re.escape(m) for m in sorted(modules)) + ")")
    lora_shapes = {k: v.shape for k, v in abstract_params(model, parts).items()
                   if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}
    keymap = adapter_keymap(model, parts, set(lora_shapes))
    tensors, fillers = expand(keymap, lora_shapes)
    names = match_source(keymap, tensors, fillers, shapes, where=f"{src} (PEFT adapter)")
    shardings, dtype = param_shardings(model, parts, mesh), np.dtype(model.param_dtype)
    for path, pieces in leaf_sources(tensors).items():
        host = build_leaf(pieces, lambda name: files.get(names[name], finite=True), dtype)
        params[path] = jax.make_array_from_callback(host.shape, shardings[path], lambda index: host[index])
    full = {}  # the leaves of the modules_to_save: the base's, with the adapter file's tensors written over them
    for t in saved:
        for (path, layer), piece in zip(t.pieces, t.to_jax(files.get(PREFIX + t.name, finite=True))):
            if path is not None:
                leaf = full.setdefault(path, np.array(params[path], dtype))
                leaf[() if layer is None else layer] = piece
    for path, host in full.items():
        params[path] = jax.make_array_from_callback(host.shape, shardings[path], lambda index, host=host: host[index])
    tokenizer = os.path.join(record_root(base), RECORD_DIR)
    trained = sorted(set(lora_shapes) | set(full))  # a PEFT export of `dst` saves the same modules
    write_checkpoint_dir(dst, params, dict(meta, model=model.to_dict(), adapter_config=config, trained=trained),
                         tokenizer, extra_from=base)
    return model
