"""Export: a vlm_jax checkpoint directory (vlm_jax/checkpoints/directory.py) or a training workdir[@step] -> an
HF directory (`config.json`, sharded safetensors, tokenizer files; for LLaVA, Qwen2-VL and BLIP-2 also the
processor, chat template and generation config transformers serves it with: vlm_jax/interop/serving.py, from the
checkpoint's conversation and image settings, `inference.inference_config`), the original LLaVA layout, or a PEFT
adapter (vlm_jax/interop/peft.py), or the XVERSE-V adapter file (vlm_jax/interop/xverse_v.py). LoRA adapters
are merged into their kernels for `hf` and `original`.

Streamed: the checkpoint is read in place, one leaf or one layer of a layer stack at a time, and each torch
tensor is built from it through the same key maps the import uses and written straight into its safetensors
shard; the model is never whole in memory. The tensors import carried (the checkpoint's extra.safetensors, or a
workdir's source/ copy of it) are written back as they were stored, in the export dtype, so an import exported
to its own layout gives every tensor the source had; the source's image_token_index is the exported one.
"""

import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from transformers import PreTrainedTokenizerBase

from vlm_jax.checkpoints.directory import RECORD_DIR, StoredParams, extra_file, open_params
from vlm_jax.config import upgrade_model_config
from vlm_jax.data.image_processor import PREPROCESSOR_FILE
from vlm_jax.data.tokenizer import load_tokenizer, record_root, recorded_tokenizer
from vlm_jax.errors import InputError
from vlm_jax.interop import blip2, clip, families, llava, peft, points, qwen2_vl, qwen_vl, serving, xverse_v
from vlm_jax.interop.keymap import ConversionError, KeyMap, Tensor, expand, torch_tensors
from vlm_jax.interop.torch_files import TorchFiles, write_safetensors
from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec, merge_kernel

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
    """(family, key map, config.json) of the HF class these parts export to. `image_token_index` None: the
    source's (meta), else the family's default."""
    if image_token_index is None:
        image_token_index = meta.get("image_token_index")
    if parts == ("vision",):
        return "clip", families.get("clip").keymap(model), _merge(meta.get("hf_config"), clip.hf_config(model.vision))
    if parts == ("connector", "vision") and qwen2_vl.is_tower(model.vision):
        return ("qwen2_vl_vision", families.get("qwen2_vl_vision").keymap(model),
                _merge(meta.get("hf_config"), qwen2_vl.hf_config(model)))
    if parts == ("decoder",):
        name = llava.text_family(model.text)
        module = llava.TEXT_FAMILIES[name]
        return name, families.get(name).keymap(model), _merge(meta.get("hf_config"), module.hf_config(model.text))
    if parts == ("connector", "decoder", "vision") and qwen2_vl.is_tower(model.vision) and \
            model.text.rope_kind == "1d":  # POINTS1.5: Qwen2-VL's tower + PatchMerger + a 1-D RoPE LLM
        stored = meta.get("hf_config") if meta.get("family") == "points" else None
        return "points", points.keymap(model), points.hf_config(model, stored)
    if parts == ("connector", "decoder", "vision") and qwen2_vl.is_tower(model.vision):
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


def _stream(
    keymap: KeyMap, params: StoredParams, paths: list[str], dtype: np.dtype, lora: LoraSpec | None,
    pad_rows: dict[str, int], extra: TorchFiles | None,
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], Iterator[tuple[str, np.ndarray]]]:
    """(name -> (shape, dtype), (name, array) iterator) of the torch tensors of `keymap` over the leaves `paths`:
    every shape up front, then each tensor built when the iterator reaches it from one layer of its leaves, with
    the LoRA adapters beside a kernel merged into it when `lora` is given, and what the model does not hold
    from the carried tensors `extra`."""
    tensors, fillers = expand(keymap, {k: params.shapes[k] for k in paths})
    shapes = {t.name: (t.shape, dtype) for t in tensors} | {f.name: (f.shape, dtype) for f in fillers}
    for name, rows in pad_rows.items():
        if name in shapes and rows > shapes[name][0][0]:
            shapes[name] = ((rows, *shapes[name][0][1:]), dtype)

    def leaf(path: str, layer: int | None) -> np.ndarray:
        x = params.get(path, layer)
        module = path.removesuffix("kernel")
        if lora is not None and path.endswith("/kernel") and module + LORA_A in params.shapes:
            x = np.asarray(merge_kernel(x, params.get(module + LORA_A, layer), params.get(module + LORA_B, layer),
                                        lora.scale))
        return x.astype(dtype, copy=False)

    carried = set(extra.shapes()) if extra is not None else set()

    def carried_copy(name: str) -> np.ndarray | None:
        if name not in carried:
            return None
        x = extra.get(name)
        if x.shape != shapes[name][0]:
            raise ConversionError(f"{extra.path}: carried tensor {name} is {list(x.shape)}, but this model's is "
                                  f"{list(shapes[name][0])}")
        return x.astype(dtype, copy=False)

    def tensors_in_turn() -> Iterator[Tensor]:
        for t in tensors:
            params.keep({p for p, _ in t.pieces if p is not None})  # the cache holds this tensor's leaves only
            yield t

    def arrays() -> Iterator[tuple[str, np.ndarray]]:
        for name, t in torch_tensors(tensors_in_turn(), fillers, leaf, dtype, carried_copy):
            if shapes[name][0] != t.shape:
                # HF LLaVA needs an embedding row for its image token; a native model keeps it out of vocab.
                t = np.concatenate([t, np.zeros((shapes[name][0][0] - t.shape[0], *t.shape[1:]), t.dtype)])
            yield name, t

    return shapes, arrays()


def _write(dst: str, keymap: KeyMap, params: StoredParams, paths: list[str], dtype: np.dtype, lora: LoraSpec | None,
           config: dict[str, Any], shard_bytes: int, extra: TorchFiles | None,
           pad_rows: dict[str, int] | None = None) -> None:
    os.makedirs(dst, exist_ok=True)
    write_safetensors(dst, *_stream(keymap, params, paths, dtype, lora, pad_rows or {}, extra), shard_bytes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config | {"dtype": str(dtype)}, f, indent=2)


def _recorded_files(src: str) -> list[str]:
    """The tokenizer and image-processor files recorded with `src`: a checkpoint directory's tokenizer/ (the
    import's source files), or a workdir's tokenizer/ and then the processor its run used, which wins."""
    root = record_root(src)
    folder = os.path.join(root, RECORD_DIR)
    files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
    return files + [p for p in [os.path.join(root, PREPROCESSOR_FILE)] if os.path.isfile(p)]


def _serving_inputs(src: str, family: str) -> tuple[PreTrainedTokenizerBase, ml_collections.ConfigDict] | None:
    """(the tokenizer recorded with `src`, its inference config) when an `hf` export of `family` gets serving files
    (interop/serving.py); None otherwise, with a warning saying why where the family would have them."""
    if family not in serving.IMAGE_TOKENS:
        return None
    # Here, not at the top: inference loads the data pipeline (grain), which import and export otherwise never need.
    from vlm_jax.inference import inference_config

    folder = recorded_tokenizer(src)
    reason = f"{src} records no tokenizer"
    if folder is not None:
        try:
            return load_tokenizer(folder), inference_config(src)
        except InputError as e:  # no chat format known (an import of another family): the weights still export
            reason = str(e)
    logging.warning("export: %s; the %s export has weights and config.json only (no processor, chat template or "
                    "generation config)", reason, family)
    return None


def export_checkpoint(src: str, dst: str, fmt: str, *, dtype: str | None = None, shard_bytes: int = 5 << 30,
                      image_token_index: int | None = None) -> None:
    """Writes `dst` in `fmt` (see FORMATS); nothing is left at `dst` unless the export succeeds. The checkpoint
    is read in place, a layer at a time, by process 0, which writes every file; other processes have nothing
    to do."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; choose a new destination")
    if jax.process_index() != 0:
        return
    params, meta = open_params(src)
    extra = TorchFiles(extra_file(src)) if extra_file(src) else None
    model, parts = upgrade_model_config(meta["model"]), tuple(sorted(meta["parts"]))
    np_dtype = np.dtype(dtype or model.param_dtype)
    lora = LoraSpec.from_config(model.lora)
    adapters = [k for k in params.shapes if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)]
    weights = [k for k in params.shapes if k not in adapters]  # hf and original merge the adapters into these
    tmp = f"{dst.rstrip('/')}.partial-{os.getpid()}"
    served = None
    try:
        if fmt == "peft":
            base = (meta.get("hf_config") or {}).get("_name_or_path", "")
            # What the run trained outside LoRA goes in as modules_to_save (vlm_jax/interop/peft.py).
            trained = set(meta.get("trained", [])) & set(weights)
            modules, saved = peft.saved_tensors(model, parts, {k: params.shapes[k] for k in weights},
                                                trained) if trained else ([], [])
            leaves = adapters + sorted({p for t in saved for p, _ in t.pieces if p is not None})
            peft.write_adapter(tmp, model, parts, {k: params.get(k) for k in leaves}, np_dtype, base, modules, saved)
        elif fmt == "xverse_v":
            xverse_v.export_adapter(tmp, model, {k: params.get(k) for k in params.shapes
                                                 if k.startswith("connector/") or k in adapters}, np_dtype)
        elif fmt == "hf":
            family, keymap, config = _hf_target(model, parts, meta, image_token_index)
            served = _serving_inputs(src, family)
            if served is not None and image_token_index is None and meta.get("image_token_index") is None:
                own = serving.placeholder_id(served[0], family)  # a native model's: the id its run used
                if own is not None:
                    family, keymap, config = _hf_target(model, parts, meta, own)
            vocab = config.get("text_config", {}).get("vocab_size", 0)
            pad = {"language_model.model.embed_tokens.weight": vocab, "language_model.lm_head.weight": vocab}
            _write(tmp, keymap, params, weights, np_dtype, lora, config, shard_bytes, extra, pad)
        else:
            if not {"connector", "decoder"} <= set(parts):
                raise ConversionError(f"the original LLaVA layout needs a connector and a decoder; {src} has {parts}")
            tower = (meta.get("hf_config") or {}).get("mm_vision_tower", "")
            if "vision" in parts:
                tower = os.path.join(os.path.abspath(dst), "vision_tower")
                _write(os.path.join(tmp, "vision_tower"), families.get("clip").keymap(model),
                       params, [k for k in weights if k.startswith("vision/")], np_dtype, lora,
                       _merge(meta.get("vision_hf_config"), clip.hf_config(model.vision)), shard_bytes, extra)
            stored = meta.get("hf_config") if meta.get("family") == "llava_original" else None
            _write(tmp, llava.original_keymap(model), params, [k for k in weights if not k.startswith("vision/")],
                   np_dtype, lora, _merge(stored, llava.original_hf_config(model, tower)), shard_bytes, extra)
        for file in _recorded_files(src):
            shutil.copy(file, os.path.join(tmp, os.path.basename(file)))
        if served is not None:
            serving.write_serving_files(tmp, family, config, served[1], served[0])
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
