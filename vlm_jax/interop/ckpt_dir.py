"""The vlm_jax checkpoint directory that import writes and export, soup and `init_params` read:
`params/` (orbax, params only), `vlm_jax.json` (family, parts, model config, the source HF configs) and
`tokenizer/` (the source's tokenizer files, when it had any). `load_params` also reads a training workdir's
checkpoint, so export and soup take either."""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from vlm_jax.interop.keymap import ConversionError
from vlm_jax.interop.model_params import abstract_params, flat, param_shardings, unflat
from vlm_jax.train.checkpoint import restore_params, save_params
from vlm_jax.train.loop import workdir_params

META_FILE = "vlm_jax.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json")


def read_meta(ckpt: str) -> dict[str, Any]:
    file = os.path.join(ckpt, META_FILE)
    if not os.path.isfile(file):
        raise ConversionError(f"{ckpt} is not a vlm_jax checkpoint directory (no {META_FILE})")
    with open(file) as f:
        return json.load(f)


def write_checkpoint_dir(dst: str, params: dict[str, jax.Array], meta: dict[str, Any],
                         tokenizer_from: str | None = None) -> None:
    """Writes `dst` from flat `path -> array` params (every process takes part in the save); copies the
    tokenizer files found in the folder `tokenizer_from`. Nothing is left at `dst`
    unless the whole write succeeds."""
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; choose a new destination")
    tmp = f"{dst.rstrip('/')}.partial-{os.getpid()}"
    try:
        if jax.process_index() == 0:
            os.makedirs(tmp)
        save_params(os.path.join(tmp, "params"), unflat(params))
        if jax.process_index() == 0:
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            folder = tokenizer_from
            found = [n for n in TOKENIZER_FILES if folder and os.path.isfile(os.path.join(folder, n))]
            if found:
                os.makedirs(os.path.join(tmp, "tokenizer"))
                for n in found:
                    shutil.copy(os.path.join(folder, n), os.path.join(tmp, "tokenizer", n))
            os.replace(tmp, dst)
    finally:
        if jax.process_index() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)


def load_params(src: str, mesh: Mesh) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """(flat path -> array, checkpoint-directory meta) of a checkpoint directory or `WORKDIR[@STEP]`."""
    if os.path.isfile(os.path.join(src, META_FILE)):
        meta = read_meta(src)
        model, parts = ml_collections.ConfigDict(meta["model"]), tuple(sorted(meta["parts"]))
        params = restore_params(os.path.join(src, "params"), unflat(abstract_params(model, parts)),
                                unflat(param_shardings(model, parts, mesh)))
        return flat(params), meta
    if not os.path.isdir(os.path.join(src.partition("@")[0], "checkpoints")):
        raise ConversionError(f"{src} is neither a checkpoint directory (no {META_FILE}) nor a training "
                              "workdir (no checkpoints/)")
    params, config = workdir_params(src, list(mesh.devices.flat))
    params = flat(params)
    meta = dict(family="vlm_jax", parts=sorted({k.split("/", 1)[0] for k in params}),
                model=config.model.to_dict(), source=src)
    return params, meta
