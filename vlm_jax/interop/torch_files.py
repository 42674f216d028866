"""PyTorch checkpoint files, read and written one tensor at a time (no model code is ever executed).

Reads `*.safetensors` (preferred when a directory has both) or `*.bin`/`*.pth`/`*.pt` state dicts via
`torch.load(weights_only=True, mmap=True)` (a LAVIS-style `{"model": state_dict, ...}` checkpoint included);
writes sharded safetensors with an HF index, a tensor at a time.
"""

import glob
import json
import math
import os
import pickle
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

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
                # pread, not mmap: a mapped file's pages would stay resident (and count) as the model is read.
                try:
                    handle = safe_open(f, framework="pt", backend="pread")
                except SafetensorError as e:  # a truncated or garbled file: its header does not describe it
                    raise ConversionError(f"{f}: not a readable safetensors file ({e})") from None
                names = list(handle.keys())
            else:
                handle = _torch_load(f)
                if not isinstance(handle, dict):
                    raise ConversionError(f"{f}: holds a {type(handle).__name__}, not a state dict")
                # LAVIS / MiniGPT-4 checkpoints (XVERSE-V's adapter file) hold the state dict under "model",
                # beside the optimizer state and the run config.
                if isinstance(handle.get("model"), dict):
                    handle = handle["model"]
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

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of tensor `name`, read from the file's header (nothing is loaded)."""
        _, h = self._where[name]
        if hasattr(h, "get_slice"):
            return _FROM_SAFETENSORS[h.get_slice(name).get_dtype()]
        return _to_numpy(torch.empty(0, dtype=h[name].dtype)).dtype

    def get(self, name: str, finite: bool = False) -> np.ndarray:
        """Tensor `name`; with `finite`, an error naming it and its file if it holds a NaN or Inf (a tensor the model
        computes with: a carried one is copied as it is)."""
        f, h = self._where[name]
        x = _to_numpy(h.get_tensor(name) if hasattr(h, "get_tensor") else h[name])
        if finite and (x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16) and not np.isfinite(x).all():
            raise ConversionError(f"{f}: tensor {name} holds {x.size - np.isfinite(x).sum()} non-finite values "
                                  "(NaN or Inf)")
        return x

    def file_of(self, name: str) -> str:
        return self._where[name][0]


def _torch_load(f: str):
    """The object `torch.load(weights_only=True)` gives for the file `f`; a file it refuses (objects other than
    tensors) or cannot read (truncated, garbled) is an error naming the file."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.split("WeightsUnpickler error: ", 1)[1].split(". Please")[0]
                    for line in str(e).splitlines() if "WeightsUnpickler error: " in line), str(e).splitlines()[0])
        raise ConversionError(f"{f}: torch.load(weights_only=True) refuses it ({why}); if the file is trusted, "
                              "load it with weights_only=False and save its tensors as safetensors") from None
    # A zip that is cut short (RuntimeError), or bytes that are no pickle (the unpickler's EOFError, or KeyError
    # from its memo lookup).
    except (RuntimeError, EOFError, KeyError) as e:
        raise ConversionError(f"{f}: not a readable PyTorch checkpoint ({str(e).split('. ')[0]})") from None


def write_state_dict(file: str, tensors, key: str | None = None) -> None:
    """(name, array) pairs as one `torch.save` state dict (what repos that `torch.load` their files read),
    nested under `key` when the reading code indexes the loaded object first (`torch.load(f)[key]`)."""
    state = {name: _to_torch(x) for name, x in tensors}
    torch.save(state if key is None else {key: state}, file)


# The safetensors header's dtype names.
_SAFETENSORS_DTYPES = {np.dtype(t): name for t, name in (
    (np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (ml_dtypes.bfloat16, "BF16"), (np.int64, "I64"),
    (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"), (np.uint8, "U8"), (np.bool_, "BOOL"))}
_FROM_SAFETENSORS = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def write_safetensors(dst: str, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]], shard_bytes: int, prefix: str = "model") -> list[str]:
    """Writes the tensors `shapes` announces (name -> (shape, dtype)), which `tensors` yields as (name, array)
    in the same order, as `prefix.safetensors`, or as numbered shards of at most `shard_bytes` with
    `prefix.safetensors.index.json`. Each file's header is written from `shapes` before its tensors, so each
    tensor goes to disk as it arrives and is never held with the others (the safetensors library writes a
    file from a dict of all its tensors). Returns the file names."""
    def nbytes(name: str) -> int:
        shape, dtype = shapes[name]
        return math.prod(shape) * np.dtype(dtype).itemsize

    shards, size = [[]], 0
    for name in shapes:
        if size and size + nbytes(name) > shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes(name)
    n = len(shards)
    names = ([f"{prefix}.safetensors"] if n == 1 else
             [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    tensors = iter(tensors)
    for file, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            shape, dtype = shapes[name]
            header[name] = dict(dtype=_SAFETENSORS_DTYPES[np.dtype(dtype)], shape=list(shape),
                                data_offsets=[offset, offset + nbytes(name)])
            offset += nbytes(name)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads its header with spaces to 8-byte alignment
        with open(os.path.join(dst, file), "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)  # u64 little-endian header size, then the header
            for want in shard:
                name, x = next(tensors, (None, None))
                if name != want or x.shape != tuple(shapes[want][0]) or x.dtype != np.dtype(shapes[want][1]):
                    got = None if name is None else (name, x.shape, x.dtype)
                    raise ValueError(f"expected tensor {want} {shapes[want]} next, got {got}")
                f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
    extra = next(tensors, None)
    if extra is not None:
        raise ValueError(f"tensor {extra[0]} was not announced in `shapes`")
    if n > 1:
        index = {"metadata": {"total_size": sum(nbytes(name) for name in shapes)},
                 "weight_map": {t: names[k] for k, shard in enumerate(shards) for t in shard}}
        with open(os.path.join(dst, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
