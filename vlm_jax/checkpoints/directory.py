"""The vlm_jax checkpoint directory that import writes and export, soup and `init_params` read:
`params/` (orbax, params only), `vlm_jax.json` (family, parts, model config, the source HF configs) and
`tokenizer/` (the source's tokenizer files, when it had any). `load_params` (restored arrays) and `open_params`
(read in place, a layer at a time) also take a training workdir's checkpoint, so export and soup take either."""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlm_jax.checkpoints.errors import ConversionError
from vlm_jax.checkpoints.params_only import fit_params, restore_params, save_params
from vlm_jax.checkpoints.streaming import StoredArray, StreamedLeaf, stored_arrays
from vlm_jax.checkpoints.workdir import is_workdir, workdir_params, workdir_stored_params
from vlm_jax.config import upgrade_model_config
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

META_FILE = "vlm_jax.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the image processor's, of those


def read_meta(ckpt: str) -> dict[str, Any]:
    file = os.path.join(ckpt, META_FILE)
    if not os.path.isfile(file):
        raise ConversionError(f"{ckpt} is not a vlm_jax checkpoint directory (no {META_FILE})")
    with open(file) as f:
        return json.load(f)


def write_checkpoint_dir(dst: str, params: dict[str, jax.Array | StreamedLeaf], meta: dict[str, Any],
                         tokenizer_from: str | None = None, processor_from: str | None = None) -> None:
    """Writes `dst` from flat `path -> array` params, or StreamedLeaf values that are built as they are written
    (every process takes part in the save); copies the tokenizer files found in the folder `tokenizer_from`, and
    the image-processor files of the folder `processor_from` (a separate vision tower's) where it has none.
    Nothing is left at `dst` unless the whole write succeeds."""
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; choose a new destination")
    # One temporary directory for all processes, named by process 0's pid.
    tmp = f"{dst.rstrip('/')}.partial-{int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))}"
    try:
        if jax.process_index() == 0:
            os.makedirs(tmp)
        save_params(os.path.join(tmp, "params"), unflat(params))
        if jax.process_index() == 0:
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            found = {n: tokenizer_from for n in TOKENIZER_FILES
                     if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, n))}
            if processor_from and not set(found) & set(PROCESSOR_FILES):
                found.update({n: processor_from for n in PROCESSOR_FILES
                              if os.path.isfile(os.path.join(processor_from, n))})
            if found:
                os.makedirs(os.path.join(tmp, "tokenizer"))
                for n, folder in found.items():
                    shutil.copy(os.path.join(folder, n), os.path.join(tmp, "tokenizer", n))
            os.replace(tmp, dst)
    finally:
        if jax.process_index() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)


def _is_workdir(src: str) -> bool:
    """Whether `src` is a training `WORKDIR[@STEP]` rather than a checkpoint directory (else an error)."""
    if os.path.isfile(os.path.join(src, META_FILE)):
        return False
    if not is_workdir(src):
        raise ConversionError(f"{src} is neither a checkpoint directory (no {META_FILE}) nor a training "
                              "workdir (no checkpoints/)")
    return True


def _workdir_meta(src: str, parts: set[str], config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(family="vlm_jax", parts=sorted(parts), model=config.model.to_dict(), source=src)


def load_params(src: str, mesh: Mesh) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """(flat path -> array, checkpoint-directory meta) of a checkpoint directory or `WORKDIR[@STEP]`."""
    if not _is_workdir(src):
        meta = read_meta(src)
        model, parts = upgrade_model_config(meta["model"]), tuple(sorted(meta["parts"]))
        params = restore_params(os.path.join(src, "params"), unflat(abstract_params(model, parts)),
                                unflat(param_shardings(model, parts, mesh)))
        return flat(params), meta
    params, config = workdir_params(src, mesh)
    return params, _workdir_meta(src, {k.split("/", 1)[0] for k in params}, config)


class StoredParams:
    """A checkpoint's parameters read in place instead of restored: a leaf, or one layer of a layer stack, at a
    time, cast to the model's dtype (as a restore would). The stored chunk a layer came from stays cached while
    `keep` names its module, so a stack stored as one chunk (a training checkpoint) is decoded once, not per layer."""

    def __init__(self, arrays: dict[str, StoredArray], dtypes: dict[str, np.dtype]):
        self._arrays, self._dtypes = arrays, dtypes
        self.shapes = {k: a.shape for k, a in arrays.items()}
        self._cached: dict[str, tuple[int, np.ndarray]] = {}  # path -> (first row, rows)

    def keep(self, paths: set[str]) -> None:
        """Drops the cached rows of every leaf outside the modules (parent paths) of `paths`."""
        modules = {p.rsplit("/", 1)[0] for p in paths}
        self._cached = {k: v for k, v in self._cached.items() if k.rsplit("/", 1)[0] in modules}

    def get(self, path: str, layer: int | None = None) -> np.ndarray:
        """The leaf `path`, or row `layer` of it."""
        array, dtype = self._arrays[path], self._dtypes[path]
        if layer is None:
            return array.read().astype(dtype, copy=False)
        start = layer - layer % array.chunk_rows
        if self._cached.get(path, (None,))[0] != start:
            self._cached.pop(path, None)  # before the read: one block of this leaf in memory, not two
            rows = array.read(slice(start, min(start + array.chunk_rows, array.shape[0])))
            self._cached[path] = start, rows.astype(dtype, copy=False)
        return self._cached[path][1][layer - start]


def open_params(src: str) -> tuple[StoredParams, dict[str, Any]]:
    """(StoredParams, checkpoint-directory meta) of a checkpoint directory or `WORKDIR[@STEP]`: what
    `load_params` gives, checked against the model the same way, without loading anything."""
    if _is_workdir(src):
        arrays, config = workdir_stored_params(src)
        meta = _workdir_meta(src, {k.split("/", 1)[0] for k in arrays}, config)
    else:
        meta = read_meta(src)
        arrays = stored_arrays(os.path.join(src, "params"))
    model, parts = upgrade_model_config(meta["model"]), tuple(sorted(meta["parts"]))
    want = abstract_params(model, parts)
    keys = fit_params(src, {k: a.shape for k, a in arrays.items()}, {k: tuple(v.shape) for k, v in want.items()})
    return StoredParams({k: arrays[k] for k in keys}, {k: np.dtype(want[k].dtype) for k in keys}), meta
