"""Ahead-of-time planning of a train step: compile the real step for a target's devices (a TPU topology through
libtpu, or this host's CPU devices) with no weights allocated, and report what it needs per chip.

Model FLOPs are counted analytically per component (vision tower, connector, LLM), for the tokens each one sees
in a step: 2 FLOPs per parameter and token forward; 2 more for the weight gradient of a trainable parameter; 2
more for the activation gradient where a gradient has to flow through (something before the component trains,
or for a component's own trainable layers). So a fully trained LLM counts 6 N T, a frozen tower nothing upstream
of which trains counts 2 N T (forward only), a frozen LLM under a trained projector 4 N T. Attention scores and
values add 4 L^2 H D per layer and sequence forward (half that when causal), times 3 where a gradient flows,
over whole rows (packed examples counted as one sequence) or the tower's sequences (the image-input kind's
`vision_tokens`). The embedding lookup table is not counted (a tied embedding is, as the output projection).
"""

import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from vlm_jax import image_inputs, parallel
from vlm_jax.config import check_values
from vlm_jax.data.mixture import mixture_names
from vlm_jax.data.pipeline import row_layout
from vlm_jax.layers.attention import resolve_backend
from vlm_jax.train.loop import Setup, check_batch_size, check_segments
from vlm_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 per chip
    devices_per_chip: int = 1  # JAX devices a chip shows (TPU v4 topologies list one per TensorCore)


GIB = 1 << 30
# device_kind -> chip, from the vendor's published specifications.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(32 * GIB, 275e12, devices_per_chip=2),
    "TPU v5 lite": Chip(16 * GIB, 197e12),  # v5e
    "TPU v5": Chip(95 * GIB, 459e12),  # v5p
    "TPU v6 lite": Chip(32 * GIB, 918e12),  # v6e (Trillium)
}

COMPONENTS = ("vision", "connector", "decoder")  # in the order the forward runs them


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `config`, placed by `sharding`, without building it."""
    layout = row_layout(config)
    one = layout.empty(layout.group)  # one group of rows: every key's leading axis scales with the batch
    scale = config.batch_size // layout.group
    return {k: jax.ShapeDtypeStruct((v.shape[0] * scale, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in one.items()}


def component_tokens(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int, int, bool]]:
    """component -> (tokens per step, sequence length its attention sees, number of such sequences, causal)."""
    vision, merged = image_inputs.make(config.model).vision_tokens(config)
    rows, seq_len = config.batch_size, config.data.seq_len
    return {"vision": (*vision, False), "connector": (merged, 0, 0, False),
            "decoder": (rows * seq_len, seq_len, rows, True)}


def trainable_counts(setup: Setup) -> dict[str, tuple[int, int]]:
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


def model_flops(config: ml_collections.ConfigDict, setup: Setup) -> float:
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


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled step; peak = arguments + outputs not aliased to (donated) arguments + temp."""
    m = compiled.memory_analysis()
    out = dict(argument_bytes_per_chip=int(m.argument_size_in_bytes), output_bytes_per_chip=int(m.output_size_in_bytes),
               temp_bytes_per_chip=int(m.temp_size_in_bytes))
    out["peak_bytes_per_chip"] = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return out


# libtpu refuses a step whose temporaries exceed HBM, naming what they would need (binary units).
_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED: .*HLO temporaries \(([0-9.]+)([KMGT])\)")


def refused_memory(error: Exception, arguments: list[jax.ShapeDtypeStruct]) -> dict[str, int] | None:
    """The memory of a step the compiler refused for want of HBM: its temporaries as the error names them, its
    arguments' per-device bytes from their shardings (outputs are donated into them); None for another error."""
    found = _EXHAUSTED.search(str(error))
    if not found:
        return None
    temp = int(float(found.group(1)) * 1024 ** (" KMGT".index(found.group(2))))
    args = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in arguments)
    return dict(argument_bytes_per_chip=args, output_bytes_per_chip=None, temp_bytes_per_chip=temp,
                peak_bytes_per_chip=args + temp)


def plan(config: ml_collections.ConfigDict, devices: list) -> dict[str, Any]:
    """Compiles `config`'s train step for `devices` ahead of time and reports shapes, memory and FLOPs (one
    dict, the fields launch/plan.py prints)."""
    check_values(config)
    config = config.copy_and_resolve_references()
    # The host compiling is not the target: `auto` must mean the target's kernel, not this CPU's.
    config.model.attention = resolve_backend(config.model.attention, devices[0].platform)
    check_segments(config)
    setup = Setup(config, devices)
    check_batch_size(config, setup.mesh)
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, seed=config.seed,
                           micro_batches=config.micro_batches, sources=mixture_names(config))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         setup.abstract_state, setup.state_shardings)
    batch = abstract_batch(config, parallel.batch_sharding(setup.mesh))
    start = time.perf_counter()
    with jax.set_mesh(setup.mesh):
        lowered = step.jitted.lower(state, batch)
        try:
            used = memory(lowered.compile())
        except jax.errors.JaxRuntimeError as e:
            used = refused_memory(e, jax.tree.leaves((state, batch)))
            if used is None:
                raise
    compile_s = time.perf_counter() - start
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    counts = trainable_counts(setup)
    out = dict(
        chips=len(devices) // (chip.devices_per_chip if chip else 1), devices=len(devices), chip_kind=kind,
        mesh=dict(setup.mesh.shape),
        params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_params))),
        trainable_params=sum(t for _, t in counts.values()),
        batch_size=config.batch_size, micro_batches=config.micro_batches,
        tokens_per_step=config.batch_size * config.data.seq_len,
        **used)
    # Memory is per device; on a chip of several devices each holds its share of the chip's HBM.
    hbm = chip.hbm_bytes // chip.devices_per_chip if chip else None
    flops = model_flops(config, setup)
    out.update(hbm_bytes_per_chip=hbm, fits=None if hbm is None else out["peak_bytes_per_chip"] <= hbm,
               model_flops_per_step=flops,
               step_s_at_peak=round(flops / (out["chips"] * chip.peak_flops), 3) if chip else None,
               compile_s=round(compile_s, 1))
    return out
