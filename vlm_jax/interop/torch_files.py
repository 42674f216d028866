"""PyTorch checkpoint files, read and written one tensor at a time (no model code is ever executed).

Reads `*.safetensors` (preferred when a directory has both) or `*.bin`/`*.pth`/`*.pt` state dicts via
`torch.load(weights_only=True, mmap=True)`; writes sharded safetensors with an HF index.
"""

import glob
import json
import os

import ml_dtypes
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_jax.interop.keymap import ConversionError

_TORCH_SUFFIXES = (".bin", ".pth", ".pt")
# Files that are not the model's weights even when they sit in its directory.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.pth")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bf16; keep the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class TorchFiles:
    """The tensors of a checkpoint directory or file, by name."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                               if f.endswith(_TORCH_SUFFIXES) and os.path.basename(f) not in _NOT_WEIGHTS)
        elif os.path.isfile(path):
            files = [path]
        else:
            raise ConversionError(f"{path}: no such file or directory")
        if not files:
            raise ConversionError(f"{path}: no *.safetensors or *.bin/*.pth/*.pt weight files")
        self.path = path
        self._where: dict[str, tuple[str, object]] = {}
        for f in files:
            if f.endswith(".safetensors"):
                handle = safe_open(f, framework="pt")
                names = list(handle.keys())
            else:
                try:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
                    handle = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(handle, dict):
                    raise ConversionError(f"{f}: holds a {type(handle).__name__}, not a state dict")
                names = [k for k, v in handle.items() if isinstance(v, torch.Tensor)]
            for name in names:
                if name in self._where:
                    raise ConversionError(f"tensor {name} is in both {self._where[name][0]} and {f}")
                self._where[name] = (f, handle)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, (_, h) in self._where.items():
            out[name] = tuple(h.get_slice(name).get_shape()) if hasattr(h, "get_slice") else tuple(h[name].shape)
        return out

    def get(self, name: str) -> np.ndarray:
        _, h = self._where[name]
        return _to_numpy(h.get_tensor(name) if hasattr(h, "get_tensor") else h[name])

    def file_of(self, name: str) -> str:
        return self._where[name][0]


def write_state_dict(file: str, tensors) -> None:
    """(name, array) pairs as one `torch.save` state dict (what repos that `torch.load` their files read)."""
    torch.save({name: _to_torch(x) for name, x in tensors}, file)


def write_safetensors(dst: str, tensors, shard_bytes: int, prefix: str = "model") -> list[str]:
    """Writes (name, array) pairs as `prefix.safetensors`, or as numbered shards of at most `shard_bytes`
    with `prefix.safetensors.index.json`, holding one shard in memory at a time. Returns the file names."""
    shards: list[list[str]] = []
    pending, size, total = {}, 0, 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            shards.append(list(pending))
            save_file(pending, os.path.join(dst, f"{prefix}.part{len(shards)}"), metadata={"format": "pt"})
            pending, size = {}, 0

    for name, x in tensors:
        if size and size + x.nbytes > shard_bytes:
            flush()
        pending[name] = _to_torch(x)
        size += x.nbytes
        total += x.nbytes
    flush()
    n = len(shards)
    names = ([f"{prefix}.safetensors"] if n == 1 else
             [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    for k, name in enumerate(names):
        os.replace(os.path.join(dst, f"{prefix}.part{k + 1}"), os.path.join(dst, name))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: names[k] for k, shard in enumerate(shards) for t in shard}}
        with open(os.path.join(dst, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
