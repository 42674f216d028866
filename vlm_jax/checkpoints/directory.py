"""The vlm_jax checkpoint directory that import writes and export, soup and `init_params` read:
`params/` (orbax, params only), `vlm_jax.json` (family, parts, model config, the source HF configs, the source's
image_token_index), `extra.safetensors` (the source tensors the model does not compute with, untouched, in
their source dtype: vlm_jax/interop/keymap.py) and `tokenizer/` (the source's tokenizer files), the last two when
the source had any. `load_params` (restored arrays) and `open_params` (read in place, a layer at a time) also
take a training workdir's checkpoint, so export and soup take either.

A run started from a checkpoint (`init_params`) keeps its provenance in `WORKDIR/source/`: the starting
checkpoint's `vlm_jax.json` (without its model) and `extra.safetensors` (`carry_source`), and the trainer
writes `WORKDIR/trained.json` (the parameters its optimizer updates); a workdir's meta is built from both.
"""

import json
import os
import shutil
from collections.abc import Callable
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
from vlm_jax.data.tokenizer import RECORD_DIR
from vlm_jax.files import replace_file
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

META_FILE = "vlm_jax.json"
EXTRA_FILE = "extra.safetensors"
SOURCE_DIR, TRAINED_FILE = "source", "trained.json"  # in a workdir
# A checkpoint's own keys, which the meta carried into a workdir does not take from its source.
_OWN_KEYS = ("model", "parts", "source", "trained")
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
                         tokenizer_from: str | None = None, processor_from: str | None = None, *,
                         extra_from: str | None = None, write_extra: Callable[[str], None] | None = None) -> None:
    """Writes `dst` from flat `path -> array` params, or StreamedLeaf values that are built as they are written
    (every process takes part in the save); copies the tokenizer files found in the folder `tokenizer_from`, the
    image-processor files of the folder `processor_from` (a separate vision tower's) where it has none, and the
    carried tensors of the checkpoint or workdir `extra_from`, or has `write_extra(folder)` write EXTRA_FILE into
    the folder (process 0 alone calls it).
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
                os.makedirs(os.path.join(tmp, RECORD_DIR))
                for n, folder in found.items():
                    shutil.copy(os.path.join(folder, n), os.path.join(tmp, RECORD_DIR, n))
            if write_extra is not None:
                write_extra(tmp)
            elif extra_from is not None and extra_file(extra_from):
                shutil.copy(extra_file(extra_from), os.path.join(tmp, EXTRA_FILE))
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


def extra_file(src: str) -> str | None:
    """The carried tensors (EXTRA_FILE) of a checkpoint directory or `WORKDIR[@STEP]`; None where there are none."""
    folder = os.path.join(src.partition("@")[0], SOURCE_DIR) if _is_workdir(src) else src
    file = os.path.join(folder, EXTRA_FILE)
    return file if os.path.isfile(file) else None


def _source_meta(src: str) -> dict[str, Any]:
    """The provenance a checkpoint directory or `WORKDIR[@STEP]` carries (its meta without _OWN_KEYS)."""
    if _is_workdir(src):
        file = os.path.join(src.partition("@")[0], SOURCE_DIR, META_FILE)
        if not os.path.isfile(file):
            return dict(family="vlm_jax")
        with open(file) as f:
            return json.load(f)
    return {k: v for k, v in read_meta(src).items() if k not in _OWN_KEYS}


def carry_source(init: str, workdir: str) -> None:
    """Copies the provenance and carried tensors of the checkpoint directory or `WORKDIR[@STEP]` a run starts
    from (`init_params`) into `workdir/source/`, once: a resumed or restarted run keeps what is there. Process 0
    writes it."""
    dst = os.path.join(workdir, SOURCE_DIR)
    if jax.process_index() != 0 or os.path.isdir(dst):
        return
    if not os.path.isfile(os.path.join(init, META_FILE)) and not is_workdir(init):
        return  # a bare params folder (the demo's stage 0) has no provenance
    tmp = f"{dst}.partial-{os.getpid()}"
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(_source_meta(init), f, indent=2)
        if extra_file(init):
            shutil.copy(extra_file(init), os.path.join(tmp, EXTRA_FILE))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def write_trained(workdir: str, paths: list[str]) -> None:
    """Records the parameter paths a run's optimizer updates (`trained` in the workdir's meta; PEFT export saves
    those outside LoRA as modules_to_save). Process 0 writes it."""
    if jax.process_index() == 0:
        replace_file(os.path.join(workdir, TRAINED_FILE), lambda f: json.dump(sorted(paths), f, indent=1))


def _workdir_meta(src: str, parts: set[str], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The source's provenance (`_source_meta`) with the run's parts, model and trained parameters."""
    meta = dict(_source_meta(src), parts=sorted(parts), model=config.model.to_dict(), source=src)
    trained = os.path.join(src.partition("@")[0], TRAINED_FILE)
    if os.path.isfile(trained):
        with open(trained) as f:
            meta["trained"] = json.load(f)
    return meta


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
