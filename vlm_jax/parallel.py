"""The only place that knows about meshes: mesh construction, logical-axis rules, shardings."""

import importlib.util
import logging
import math
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters shard over fsdp (embed) and tensor (heads, mlp, vocab);
# activations shard their batch over data x fsdp and their head/mlp/vocab dims over tensor.
LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch", None),
    ("norm", None),
)

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes; one axis may be -1, meaning 'all remaining devices'."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {n_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: logical constraints inside the model are hints that the compiler may propagate.
    return Mesh(np.array(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide a dimension (tiny test models, GQA with few kv heads)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        if len(kept) != len(names):
            logging.debug("replicating dim %d over %s (not divisible)", dim, set(names) - set(kept))
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly logically boxed) abstract arrays; unboxed leaves replicate."""
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
    return jax.tree.map(lambda spec, shape: NamedSharding(mesh, fit_spec(spec, shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Global arrays, batch-sharded over data x fsdp, from each process's own rows of a batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def whole_in_context(x: jax.Array) -> jax.Array:
    """Inside jit: `x` replicated over the mesh of `jax.set_mesh`, if one is set; `x` itself otherwise."""
    return x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, P())


def batch_shards_in_context(size: int) -> int:
    """Inside jit: how many ways the mesh of `jax.set_mesh` splits a batch dimension of `size` under the logical
    axis rules in context (act_batch); 1 with no mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = fit_spec(nn.logical_to_mesh_axes(("act_batch",)), (size,), mesh)
    names = (spec[0],) if isinstance(spec[0], str) else spec[0] or ()
    return math.prod(mesh.shape[n] for n in names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def topology_devices(name: str) -> list:
    """The devices of a named target for ahead-of-time compilation: `cpu:N` (this host's CPU devices, N of them:
    the process must have been started with at least N, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=N)
    or a TPU topology such as `v5p:2x2x2`, `v5e:4x4`, `v6e:4x4` (abstract TPU devices described by libtpu; no TPU
    needed)."""
    kind, sep, shape = name.partition(":")
    if not sep or not shape:
        raise ValueError(f"topology {name!r}: expected cpu:N or a TPU topology such as v5p:2x2x2 or v5e:4x4")
    if kind == "cpu":
        if not shape.isdigit() or int(shape) < 1:
            raise ValueError(f"topology {name!r}: cpu:N takes a device count N >= 1")
        devices = jax.devices("cpu")
        if len(devices) < int(shape):
            raise ValueError(f"topology {name!r}: this process has {len(devices)} CPU devices; start it with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={shape}")
        return devices[:int(shape)]
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"topology {name!r} needs libtpu: pip install -r requirements-plan.txt")
    from jax.experimental import topologies

    # libtpu only describes the topology here: no cloud metadata to ask, no TPU to lock against other processes.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's own message says what is wrong with the name (JaxRuntimeError)
        raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
