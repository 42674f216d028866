"""Ahead-of-time planning of a train step: compile the real step for a target's devices (a TPU topology through
libtpu, or this host's CPU devices) with no weights allocated, and report what it needs per chip (model FLOPs
counted as train/flops.py says).
"""

import math
import re
import time
from typing import Any

import jax
import ml_collections

from vlm_jax import parallel
from vlm_jax.config import check_values
from vlm_jax.data.mixture import mixture_names
from vlm_jax.data.pipeline import row_layout
from vlm_jax.layers.attention import resolve_backend
from vlm_jax.train.flops import CHIPS, model_flops, trainable_counts
from vlm_jax.train.loop import Setup, check_batch_size, check_segments
from vlm_jax.train.step import make_train_step


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `config`, placed by `sharding`, without building it."""
    layout = row_layout(config)
    one = layout.empty(layout.group)  # one group of rows: every key's leading axis scales with the batch
    scale = config.batch_size // layout.group
    return {k: jax.ShapeDtypeStruct((v.shape[0] * scale, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in one.items()}


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
               step_s_at_peak=round(flops / (out["chips"] * chip.peak(config.model.dtype)), 3) if chip else None,
               compile_s=round(compile_s, 1))
    return out
