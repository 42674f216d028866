"""Import: PyTorch checkpoints -> a params-only orbax checkpoint a training run can start from, streamed: each
leaf is read from the torch files as it is written, one layer of a layer stack at a time, and each process reads
and writes only its own shards of the target sharding. Nothing holds the whole model, or a whole layer stack.

Writes a vlm_jax checkpoint directory (vlm_jax/checkpoints/directory.py).
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.checkpoints.directory import META_FILE, read_meta, write_checkpoint_dir  # noqa: F401 (re-exported)
from vlm_jax.checkpoints.streaming import StreamedLeaf
from vlm_jax.interop import families
from vlm_jax.interop.keymap import ConversionError, build_leaf, expand, is_stack, leaf_sources, match_source
from vlm_jax.interop.torch_files import TorchFiles
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


def streamed_params(sources: list[Source], model: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, StreamedLeaf]:
    """path -> StreamedLeaf with its logical sharding: each leaf is read from the torch files when it is written,
    a layer at a time for a layer stack. Every source is checked (missing, unexpected, wrongly shaped tensors)
    here, before any tensor is read."""
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
        names = match_source(keymap, tensors, fillers, files.shapes(), where=f"{s.path} (family {s.family})")
        plans.append((s, shapes, tensors, files, names))
    dtype = np.dtype(model.param_dtype)
    out = {}
    for s, shapes, tensors, files, names in plans:
        shardings = param_shardings(model, s.spec.parts, mesh)
        for path, pieces in leaf_sources(tensors).items():
            def read(start: int, stop: int, pieces=pieces, files=files, names=names) -> np.ndarray:
                return build_leaf(pieces, lambda name: files.get(names[name]), dtype, slice(start, stop))

            shape = tuple(shapes[path])
            out[path] = StreamedLeaf(shape, dtype, shardings[path], read, 1 if is_stack(pieces) else shape[0])
    return out


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
    params = streamed_params(sources, model, mesh)
    parts = sorted({p for s in sources for p in s.spec.parts})
    meta = dict(family=sources[-1].family, parts=parts, model=model.to_dict(),
                hf_config=sources[-1].hf_config, vision_hf_config=sources[0].hf_config if vision else None)
    write_checkpoint_dir(dst, params, meta, tokenizer_from=src if os.path.isdir(src) else os.path.dirname(src),
                         processor_from=vision if vision and os.path.isdir(vision) else None)
    return model
