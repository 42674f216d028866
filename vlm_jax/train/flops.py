"""What a train step costs and what the devices running it can do: model FLOPs per step, counted analytically,
and the peak FLOP/s of the chips (a table) or of this host's CPU (measured), which MFU divides by.

Model FLOPs are counted per component (vision tower, connector, LLM), for the tokens each one sees in a step: 2
FLOPs per parameter and token forward; 2 more for the weight gradient of a trainable parameter; 2 more for the
activation gradient where a gradient has to flow through (something before the component trains, or for a
component's own trainable layers). So a fully trained LLM counts 6 N T, a frozen tower nothing upstream of which
trains counts 2 N T (forward only), a frozen LLM under a trained projector 4 N T. Attention scores and values add
4 L^2 H D per layer and sequence forward (half that when causal), times 3 where a gradient flows, over whole rows
(packed examples counted as one sequence, padding included) or the tower's sequences (the image-input kind's
`vision_tokens`). The embedding lookup table is not counted (a tied embedding is, as the output projection).
"""

import dataclasses
import functools
import logging
import math
import statistics
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from vlm_jax import image_inputs

if TYPE_CHECKING:  # loop.py imports this module
    from vlm_jax.train.loop import Setup

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 (and fp16) matmuls per chip, without structured sparsity
    devices_per_chip: int = 1  # JAX devices a chip shows (TPU v4 topologies list one per TensorCore)
    # float32 matmuls at JAX's default precision: NVIDIA GPUs run them on TF32 tensor cores (dense figure); None
    # where they run as fast as bf16 (a TPU makes one bf16 pass of them).
    fp32_flops: float | None = None

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s of one chip for matmuls in compute dtype `dtype`."""
        return self.fp32_flops if jnp.dtype(dtype) == jnp.float32 and self.fp32_flops else self.peak_flops


GIB = 1 << 30
# device_kind -> chip, from the vendors' datasheets: dense figures (NVIDIA's headline tensor-core figures assume 2:4
# sparsity; these are half of them).
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(32 * GIB, 275e12, devices_per_chip=2),
    "TPU v5 lite": Chip(16 * GIB, 197e12),  # v5e
    "TPU v5": Chip(95 * GIB, 459e12),  # v5p
    "TPU v6 lite": Chip(32 * GIB, 918e12),  # v6e (Trillium)
    "NVIDIA A100-SXM4-40GB": Chip(40 * GIB, 312e12, fp32_flops=156e12),
    "NVIDIA A100-SXM4-80GB": Chip(80 * GIB, 312e12, fp32_flops=156e12),
    "NVIDIA A100-PCIE-40GB": Chip(40 * GIB, 312e12, fp32_flops=156e12),
    "NVIDIA A100 80GB PCIe": Chip(80 * GIB, 312e12, fp32_flops=156e12),
    "NVIDIA A10": Chip(24 * GIB, 125e12, fp32_flops=62.5e12),
    "NVIDIA L4": Chip(24 * GIB, 121e12, fp32_flops=60e12),
    "NVIDIA L40S": Chip(48 * GIB, 362.05e12, fp32_flops=183e12),
    "NVIDIA H100 80GB HBM3": Chip(80 * GIB, 989.4e12, fp32_flops=494.7e12),  # H100 SXM5
    "NVIDIA H100 PCIe": Chip(80 * GIB, 756.5e12, fp32_flops=378e12),
    "NVIDIA H100 NVL": Chip(94 * GIB, 835.5e12, fp32_flops=417.5e12),
    "NVIDIA H200": Chip(141 * GIB, 989.4e12, fp32_flops=494.7e12),  # H200 SXM
    "NVIDIA H200 NVL": Chip(141 * GIB, 835.5e12, fp32_flops=417.5e12),
}

COMPONENTS = ("vision", "connector", "decoder")  # in the order the forward runs them


def component_tokens(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int, int, bool]]:
    """component -> (tokens per step, sequence length its attention sees, number of such sequences, causal)."""
    vision, merged = image_inputs.make(config.model).vision_tokens(config)
    rows, seq_len = config.batch_size, config.data.seq_len
    return {"vision": (*vision, False), "connector": (merged, 0, 0, False),
            "decoder": (rows * seq_len, seq_len, rows, True)}


def trainable_counts(setup: "Setup") -> dict[str, tuple[int, int]]:
    """component -> (parameters, trainable parameters), frozen layers of a partly trained stack counted frozen;
    the decoder's input embedding table left out unless tied (a lookup, not a matmul)."""
    masks = setup.groups.layer_masks
    tied = setup.config.model.text.tie_embeddings
    out = {c: [0, 0] for c in COMPONENTS}
    for path, leaf in traverse_util.flatten_dict(setup.abstract_params).items():
        if path[:2] == ("decoder", "embed_tokens") and not tied:
            continue
        n = math.prod(leaf.shape)
        trained = 0
        if setup.groups.trains(path):
            trained = n // len(masks[path]) * int(masks[path].sum()) if path in masks else n
        out[path[0]][0] += n
        out[path[0]][1] += trained
    return {c: (n, t) for c, (n, t) in out.items()}


def model_flops(config: ml_collections.ConfigDict, setup: "Setup") -> float:
    """Model FLOPs of one train step (module docstring)."""
    counts, tokens = trainable_counts(setup), component_tokens(config)
    attention_layers = {"vision": config.model.vision.depth, "decoder": config.model.text.layers}
    heads_dims = {"vision": (config.model.vision.heads, config.model.vision.width // config.model.vision.heads),
                  "decoder": (config.model.text.heads, config.model.text.head_dim)}
    total, upstream_trains = 0.0, False
    for c in COMPONENTS:
        params, trained = counts[c]
        n_tokens, length, sequences, causal = tokens[c]
        through = params if upstream_trains else trained  # activation gradients flow through these
        total += 2.0 * n_tokens * (params + trained + through)
        if c in attention_layers:
            heads, head_dim = heads_dims[c]
            forward = 4.0 * length ** 2 * heads * head_dim * attention_layers[c] * sequences * (0.5 if causal else 1)
            total += forward * (3 if upstream_trains or trained else 1)
        upstream_trains = upstream_trains or trained > 0
    return total


@functools.cache
def measured_gemm_flops(dtype: str, device: jax.Device) -> float:
    """FLOP/s of a 2048^3 matmul in `dtype` on `device`, the median of three after one that compiles it: a CPU's
    peak as XLA reaches it, all its cores at work (the CPU devices of a process share the host's thread pool).
    Measured once per process."""
    n = 2048
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    seconds = []
    for _ in range(3):
        begin = time.perf_counter()
        matmul(a, a).block_until_ready()
        seconds.append(time.perf_counter() - begin)
    return 2.0 * n ** 3 / statistics.median(seconds)


def peak_flops(devices: list[jax.Device], dtype: str) -> float | None:
    """Peak FLOP/s of `devices` together for matmuls in compute dtype `dtype`, or None for an accelerator
    CHIPS does not list. A chip's is its table entry's; a CPU's the measured GEMM of one of this process's
    devices, once per process (one process a host: its devices share the host's cores)."""
    first = devices[0]
    if first.platform == "cpu":
        mine = next(d for d in devices if d.process_index == jax.process_index())
        return len({d.process_index for d in devices}) * measured_gemm_flops(dtype, mine)
    chip = CHIPS.get(first.device_kind)
    if chip is None:
        return None
    # One device per chip, or one per TensorCore (`core_on_chip` 0 and 1 of a chip): count each chip once.
    chips = sum(1 for d in devices if getattr(d, "core_on_chip", 0) == 0)
    return chips * chip.peak(dtype)


def step_s_at_peak(setup: "Setup") -> float | None:
    """Seconds a step of `setup` would take at the peak FLOP/s of its mesh's devices in its compute dtype (a
    step's MFU is this over the seconds it took), or None, saying why in the log, for an unlisted accelerator."""
    devices = list(setup.mesh.devices.flat)
    peak = peak_flops(devices, setup.config.model.dtype)
    if peak is None:
        log.warning("MFU is not logged: device kind %r has no peak FLOP/s in vlm_jax/train/flops.py CHIPS",
                    devices[0].device_kind)
        return None
    return model_flops(setup.config, setup) / peak
