"""The vlm_jax checkpoint directory that import writes and export, soup and `init_params` read:
`params/` (orbax, params only), `vlm_jax.json` (family, parts, model config, the source HF configs) and
`tokenizer/` (the source's tokenizer files, when it had any)."""

import json
import os
import shutil
from typing import Any

import jax

from vlm_jax.interop.keymap import ConversionError
from vlm_jax.interop.model_params import unflat
from vlm_jax.train.checkpoint import save_params

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
