"""LoRA (Hu et al. 2021): a low-rank update `scale * dropout(x) @ A @ B` added to a Dense layer's output,
scale = alpha / rank, B initialised to zero so a fresh adapter leaves the model's outputs unchanged.

Which Dense layers get one is a regex over their module path from the model root (`model.lora.targets`,
e.g. `decoder/layers/attn/q_proj`). The adapter leaves sit next to the kernel: `lora_a` [*in, rank] and
`lora_b` [rank, *out] (plus the leading `layers` axis under scan).
"""

import dataclasses
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

LORA_A, LORA_B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: str  # regex, fully matched against the Dense module's path joined by "/"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, module_path: str) -> bool:
        return re.fullmatch(self.targets, module_path) is not None

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict | None) -> "LoraSpec | None":
        """`model.lora` -> spec, or None when rank is 0 (no adapters)."""
        if c is None or not c.rank:
            return None
        if c.rank < 0 or not 0.0 <= c.dropout < 1.0:
            raise ValueError(f"model.lora: rank must be >= 0 and dropout in [0, 1), got rank={c.rank} "
                             f"dropout={c.dropout}")
        return cls(int(c.rank), float(c.alpha), float(c.dropout), str(c.targets))


def lora_delta(a: np.ndarray, b: np.ndarray, kernel_ndim: int, scale: float):
    """scale * A @ B in the kernel's layout, fp32; A [(L,) *in, r], B [(L,) r, *out]."""
    stacked = a.ndim + b.ndim - 2 != kernel_ndim
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if stacked:
        n = a.shape[0]
        delta = jnp.matmul(a32.reshape(n, -1, a.shape[-1]), b32.reshape(n, b.shape[1], -1))
        return scale * delta.reshape(n, *a.shape[1:-1], *b.shape[2:])
    delta = jnp.matmul(a32.reshape(-1, a.shape[-1]), b32.reshape(b.shape[0], -1))
    return scale * delta.reshape(*a.shape[:-1], *b.shape[1:])


def merge_kernel(kernel, a, b, scale: float):
    """kernel + scale * A @ B, computed in fp32 and stored in the kernel's dtype: a kernel, or one layer of a
    stacked one with its adapters' matching rows."""
    return (jnp.asarray(kernel, jnp.float32) + lora_delta(a, b, kernel.ndim, scale)).astype(kernel.dtype)


def merge_lora(params, spec: LoraSpec) -> dict:
    """The same model without adapters: every kernel with a `lora_a`/`lora_b` pair becomes
    kernel + scale * A @ B (computed in fp32, stored in the kernel's dtype); the pairs are removed."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if path[-1] in (LORA_A, LORA_B):
            if path[:-1] + ("kernel",) not in flat:
                raise ValueError(f"{'/'.join(path)} has no kernel beside it to merge into")
            continue
        if path[-1] == "kernel" and path[:-1] + (LORA_A,) in flat:
            a, b = flat[path[:-1] + (LORA_A,)], flat[path[:-1] + (LORA_B,)]
            leaf = merge_kernel(leaf, a, b, spec.scale)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def has_lora(params) -> bool:
    return any(p[-1] == LORA_A for p in traverse_util.flatten_dict(params))
