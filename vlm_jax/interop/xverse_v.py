"""The XVERSE-V adapter file (`adapter_and_lora.bin`, docs/architectures.md 1.3-1.4): the connector
(`ln_vision.*`, `llama_proj.{0,2}.*`) and the LLM's LoRA adapters, PEFT-named under the vxverse module's
`llama_model.` (`llama_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).

The released loader (vxverse `VXVERSE.from_config`) runs `model.load_state_dict(torch.load(ckpt)["model"],
strict=False)`, so the state dict sits under `"model"` (the LAVIS / MiniGPT-4 checkpoint layout) and a name
that does not match the module is skipped without a word. It pins peft 0.2.0, whose LoRA layers are plain
`lora_A` / `lora_B` Linears: no `.default` adapter name, scale `alpha / r`. Names are also read in the later PEFT
spelling (`.lora_A.default.weight`) and without `llama_model.`, and any buffers a MiniGPT-4-style save keeps
(`inv_freq`, `position_ids`) are skipped. Whether the file holds `ln_vision.*` stays open (docs/provenance.md):
MiniGPT-4's saver drops frozen parameters, and vxverse freezes `ln_vision`; without it the LayerNorm keeps weight
1 / bias 0, as in vxverse. The file carries no alpha: it defaults to 2 x rank (XVERSE-V: r=128, alpha=256).
"""

import os
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.checkpoints.directory import RECORD_DIR, load_params, write_checkpoint_dir
from vlm_jax.config import upgrade_model_config
from vlm_jax.data.tokenizer import record_root
from vlm_jax.interop import peft
from vlm_jax.interop.keymap import (LINEAR, SAME, ConversionError, KeyMap, build_leaf, expand, leaf_sources,
                                    match_source, torch_tensors)
from vlm_jax.interop.torch_files import TorchFiles, write_state_dict
from vlm_jax.layers.lora import LORA_A, LORA_B
from vlm_jax.params import abstract_params, param_shardings

FILE = "adapter_and_lora.bin"
LORA_PREFIX = "llama_model."
CONNECTOR = (
    ("llama_proj.0.weight", "connector/mlp/fc1/kernel", LINEAR),
    ("llama_proj.0.bias", "connector/mlp/fc1/bias", SAME),
    ("llama_proj.2.weight", "connector/mlp/fc2/kernel", LINEAR),
    ("llama_proj.2.bias", "connector/mlp/fc2/bias", SAME),
)
LN_VISION = (
    ("ln_vision.weight", "connector/in_norm/scale", SAME),
    ("ln_vision.bias", "connector/in_norm/bias", SAME),
)
# Other spellings of the LoRA names -> ours (PEFT's in-memory `.default`, no `llama_model.` prefix).
RENAMES = ((r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight"),
           (r"^base_model\.model\.", LORA_PREFIX + "base_model.model."))
# The key the released loader indexes the loaded file with; buffers a MiniGPT-4-style save keeps beside the
# trainable parameters (RoPE frequencies, CLIP's position ids), which vxverse recomputes.
STATE_KEY = "model"
BUFFERS = (r".*\.inv_freq", r".*\.position_ids")


def keymap(model: ml_collections.ConfigDict, lora_paths: set[str], ln_vision: bool = True) -> KeyMap:
    lora = peft.adapter_keymap(model, ("decoder",), lora_paths).rows
    lora = tuple((LORA_PREFIX + r[0], *r[1:]) for r in lora)
    return KeyMap(CONNECTOR + (LN_VISION if ln_vision else ()) + lora, renames=RENAMES, ignore=BUFFERS)


def _adapter_paths(model: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in abstract_params(model, ("connector", "decoder")).items()
            if k.startswith("connector/") or k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)}


def export_adapter(dst: str, model: ml_collections.ConfigDict, params: dict, dtype: np.dtype) -> None:
    """Writes `dst/adapter_and_lora.bin` from flat `params` (connector + decoder LoRA adapters), its state dict
    under `"model"` as the released loader reads it."""
    if not model.connector.in_norm or not model.lora.rank:
        raise ConversionError("the XVERSE-V adapter file needs the ln_vision connector (connector.in_norm) and "
                              "LoRA adapters (model.lora.rank > 0)")
    shapes = _adapter_paths(model)
    lora = {k for k in shapes if not k.startswith("connector/")}
    tensors, fillers = expand(keymap(model, lora), shapes)

    def leaf(path: str, layer: int | None) -> np.ndarray:
        return np.asarray(params[path] if layer is None else params[path][layer]).astype(dtype)

    os.makedirs(dst)
    write_state_dict(os.path.join(dst, FILE), torch_tensors(tensors, fillers, leaf, dtype), key=STATE_KEY)


def import_adapter(src: str, base: str, dst: str, mesh: Mesh) -> ml_collections.ConfigDict:
    """Writes the checkpoint directory `dst`: the base checkpoint (CLIP tower + XVERSE-13B decoder, e.g.
    `convert.py import --src XVERSE-13B-Chat --vision clip-vit-large-patch14`) with the adapter file `src`."""
    files = TorchFiles(src)
    shapes = files.shapes()
    params, meta = load_params(base, mesh)
    model = upgrade_model_config(meta["model"])
    parts = tuple(sorted(set(meta["parts"]) | {"connector"}))
    canonical = {re.sub(RENAMES[0][0], RENAMES[0][1], n) for n in shapes}
    ranks = {s[0] for n, s in shapes.items() if re.search(r"\.lora_A\.", n)}
    if len(ranks) != 1:
        raise ConversionError(f"{src}: expected LoRA A tensors of one rank, found ranks {sorted(ranks)}")
    rank = ranks.pop()
    modules = peft.adapted_modules(model, ("decoder",),
                                    sorted(n.removeprefix(LORA_PREFIX) for n in canonical), src)
    model.connector.in_norm = True
    model.lora.update(rank=rank, alpha=2.0 * rank, dropout=0.05,
                      targets="(" + "|".join(re.escape(m) for m in sorted(modules)) + ")")
    adapter_shapes = _adapter_paths(model)
    lora = {k for k in adapter_shapes if not k.startswith("connector/")}
    has_ln = "ln_vision.weight" in shapes
    km = keymap(model, lora, ln_vision=has_ln)
    wanted = {k: v for k, v in adapter_shapes.items() if has_ln or "/in_norm/" not in k}
    tensors, fillers = expand(km, wanted)
    names = match_source(km, tensors, fillers, shapes, where=f"{src} (XVERSE-V adapter file)")
    shardings, dtype = param_shardings(model, parts, mesh), np.dtype(model.param_dtype)
    for path, pieces in leaf_sources(tensors).items():
        host = build_leaf(pieces, lambda name: files.get(names[name], finite=True), dtype)
        params[path] = jax.make_array_from_callback(host.shape, shardings[path], lambda index: host[index])
    if not has_ln:  # vxverse creates ln_vision fresh: weight 1, bias 0
        for leaf, value in (("scale", 1.0), ("bias", 0.0)):
            path = f"connector/in_norm/{leaf}"
            params[path] = jax.device_put(np.full(adapter_shapes[path], value, dtype), shardings[path])
    write_checkpoint_dir(dst, params, dict(meta, parts=list(parts), model=model.to_dict(), family="xverse_v"),
                         os.path.join(record_root(base), RECORD_DIR), extra_from=base)
    return model
