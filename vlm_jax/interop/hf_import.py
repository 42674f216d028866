"""Import: PyTorch checkpoints -> a params-only orbax checkpoint a training run can start from, streamed: each
leaf is read from the torch files as it is written, one layer of a layer stack at a time, and each process reads
and writes only its own shards of the target sharding. Nothing holds the whole model, or a whole layer stack.

Writes a vlm_jax checkpoint directory (vlm_jax/checkpoints/directory.py): the source tensors the model does not
compute with (vlm_jax/interop/keymap.py, "carried") go untouched into its extra.safetensors, a tensor at a time,
and the source's image_token_index into its vlm_jax.json, so that export gives back every tensor and id.
"""

import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.checkpoints.directory import (EXTRA_FILE, META_FILE, read_meta,  # noqa: F401 (re-exported)
                                           write_checkpoint_dir)
from vlm_jax.checkpoints.streaming import StreamedLeaf
from vlm_jax.interop import families
from vlm_jax.interop.keymap import (ConversionError, Tensor, build_leaf, carried, expand, is_stack, leaf_sources,
                                    match_source)
from vlm_jax.interop.torch_files import TorchFiles, write_safetensors
from vlm_jax.params import abstract_params, param_shardings

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of a checkpoint directory (or of a weight file's directory); {} when there is none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


class Source:
    """One PyTorch checkpoint and the family it is read as."""

    def __init__(self, path: str, family: str | None = None):
        self.path = path
        self.hf_config = read_hf_config(path)
        self.family = family or families.detect(self.hf_config, path)
        self.spec = families.get(self.family)


def model_config(sources: list[Source], base_model: ml_collections.ConfigDict,
                 param_dtype: str | None = None) -> ml_collections.ConfigDict:
    """`base_model` with each source's sections applied in order (later sources win, so a separate vision
    tower goes first and the LLaVA config's feature_layer/drop_cls override the CLIP defaults)."""
    model = ml_collections.ConfigDict(base_model.to_dict())
    for s in sources:
        try:
            sections = s.spec.model_config(s.hf_config)
        except KeyError as e:
            raise ConversionError(f"{s.path}/config.json lacks {e} (needed for family {s.family!r})") from None
        for name, values in sections.items():
            model[name].update(values)
    if param_dtype is None:
        hf_dtype = str(sources[-1].hf_config.get("dtype") or sources[-1].hf_config.get("torch_dtype") or "float32")
        param_dtype = _DTYPES.get(hf_dtype, "float32")
    model.param_dtype = param_dtype
    return model


class _Plan(NamedTuple):
    """One source, checked against the key map: its leaves' shapes, torch tensors, the source name of each
    tensor the model holds (`names`) and of each tensor import carries (`carried`)."""

    source: Source
    shapes: dict[str, tuple[int, ...]]
    tensors: list[Tensor]
    files: TorchFiles
    names: dict[str, str]
    carried: dict[str, str]


def _plans(sources: list[Source], model: ml_collections.ConfigDict) -> list[_Plan]:
    """Every source checked (missing, unexpected, wrongly shaped tensors) before any tensor is read."""
    plans, seen = [], set()
    for s in sources:
        overlap = seen & set(s.spec.parts)
        if overlap:
            raise ConversionError(f"{s.path}: parts {sorted(overlap)} were already given by another source")
        seen |= set(s.spec.parts)
        keymap = s.spec.keymap(model)
        shapes = {k: v.shape for k, v in abstract_params(model, s.spec.parts).items()}
        tensors, fillers = expand(keymap, shapes)
        files = TorchFiles(s.path)
        source_shapes = files.shapes()
        where = f"{s.path} (family {s.family})"
        names = match_source(keymap, tensors, fillers, source_shapes, where=where)
        plans.append(_Plan(s, shapes, tensors, files, names, carried(tensors, fillers, source_shapes, keymap)))
    return plans


def _streamed(plans: list[_Plan], model: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, StreamedLeaf]:
    dtype = np.dtype(model.param_dtype)
    out = {}
    for p in plans:
        shardings = param_shardings(model, p.source.spec.parts, mesh)
        for path, pieces in leaf_sources(p.tensors).items():
            def read(start: int, stop: int, pieces=pieces, files=p.files, names=p.names) -> np.ndarray:
                return build_leaf(pieces, lambda name: files.get(names[name], finite=True), dtype, slice(start, stop))

            shape = tuple(p.shapes[path])
            out[path] = StreamedLeaf(shape, dtype, shardings[path], read, 1 if is_stack(pieces) else shape[0])
    return out


def streamed_params(sources: list[Source], model: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, StreamedLeaf]:
    """path -> StreamedLeaf with its logical sharding: each leaf is read from the torch files when it is written,
    a layer at a time for a layer stack. Every source is checked (missing, unexpected, wrongly shaped tensors)
    here, before any tensor is read."""
    return _streamed(_plans(sources, model), model, mesh)


def _extra_writer(plans: list[_Plan]) -> Callable[[str], None] | None:
    """Writes the carried tensors of every source, bit for bit in their source dtype, one at a time, as
    EXTRA_FILE into a folder; None when no source has any."""
    where, shapes = {}, {}
    for p in plans:
        source_shapes = p.files.shapes() if p.carried else {}
        for name, src in p.carried.items():
            if name in where:
                raise ConversionError(f"{p.source.path}: carried tensor {name} was already given by "
                                      f"{where[name][0].path}")
            where[name] = p.files, src
            shapes[name] = source_shapes[src], p.files.dtype(src)
    if not where:
        return None

    def write(folder: str) -> None:
        tensors = ((name, files.get(src)) for name, (files, src) in where.items())
        write_safetensors(folder, shapes, tensors, shard_bytes=1 << 62, prefix=EXTRA_FILE.removesuffix(".safetensors"))

    return write


def import_params(sources: list[Source], model: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.Array]:
    """`streamed_params` held in memory: path -> jax.Array placed by its sharding (the parity check, tests)."""
    out = {}
    for path, leaf in streamed_params(sources, model, mesh).items():
        host = leaf.read(0, leaf.shape[0])
        out[path] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: host[index])
    return out


def import_checkpoint(
    src: str, dst: str, base_model: ml_collections.ConfigDict, mesh: Mesh, *, family: str | None = None,
    vision: str | None = None, vision_family: str = "clip", param_dtype: str | None = None,
) -> ml_collections.ConfigDict:
    """Writes the vlm_jax checkpoint directory `dst` from `src` (plus a separate vision part `vision` read as
    `vision_family`: a CLIP tower, or Ziya-BLIP2's visual checkpoint as `blip2_visual`).
    Nothing is left at `dst` unless the whole import succeeds. Returns the model config."""
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; choose a new destination")
    sources = ([Source(vision, vision_family)] if vision else []) + [Source(src, family)]
    model = model_config(sources, base_model, param_dtype)
    plans = _plans(sources, model)
    parts = sorted({p for s in sources for p in s.spec.parts})
    hf = sources[-1].hf_config
    # LlavaConfig and Blip2Config save `image_token_index`, Qwen2VLConfig `image_token_id`.
    meta = dict(family=sources[-1].family, parts=parts, model=model.to_dict(), hf_config=hf,
                vision_hf_config=sources[0].hf_config if vision else None,
                image_token_index=hf.get("image_token_index", hf.get("image_token_id")))
    write_checkpoint_dir(dst, _streamed(plans, model, mesh), meta,
                         tokenizer_from=src if os.path.isdir(src) else os.path.dirname(src),
                         write_extra=_extra_writer(plans),
                         processor_from=vision if vision and os.path.isdir(vision) else None)
    return model
