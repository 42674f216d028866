"""Params checkpoints written and read a block of rows at a time, never whole.

Orbax saves a tree of materialised arrays (and holds host copies of all of them while it writes), and restores
a tree whole; a model conversion must do neither. On disk nothing changes: `StreamedLeaf` values go through
`ArrayHandler`'s own tensorstore specs, `_sharding` file and `array_metadatas` store, under its typestr, so
the checkpoint is a normal orbax pytree checkpoint that restores leaves as jax.Arrays. `StoredArray` reads a
region of one array of such a checkpoint (or of any orbax pytree checkpoint) in place.

This reaches below orbax's public API (the write spec, the sharding-file writer), so it is pinned to the
orbax-checkpoint release in requirements; the round-trip tests catch a change there.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import traverse_util
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import jax_array_handlers, ocdbt_utils, tensorstore_utils


@dataclasses.dataclass(frozen=True)
class StreamedLeaf:
    """A params leaf (at least one axis) that is built and written a block at a time: `read(start, stop)`
    returns rows [start, stop) of axis 0 as a host array of `dtype`. Blocks are `block_rows` rows (1 for a
    layer stack, the whole leaf otherwise); a process reads only the blocks its own shards of `sharding` cover."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    read: Callable[[int, int], np.ndarray]
    block_rows: int


def _own_shards(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The distinct shard regions this process writes: each one once, by the process of the first device
    that holds it (orbax likewise writes one replica of each shard)."""
    seen, mine = set(), []
    for device, index in sharding.devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in seen:
            seen.add(bounds)
            if device.process_index == jax.process_index():
                mine.append(tuple(slice(a, b) for a, b in bounds))
    return mine


class _StreamingArrayHandler(ocp.type_handlers.ArrayHandler):
    """ArrayHandler that also takes StreamedLeaf values and writes them as jax.Array leaves."""

    async def serialize(self, values: Sequence, infos: Sequence[ocp.type_handlers.ParamInfo],
                        args: Sequence[ocp.SaveArgs] | None = None) -> list:
        args = args or [ocp.SaveArgs()] * len(values)
        streamed = [isinstance(v, StreamedLeaf) for v in values]
        leaves, leaf_infos, leaf_args = ([x for x, s in zip(seq, streamed) if s] for seq in (values, infos, args))
        if leaves:
            # Written here, one block at a time, before serialize returns: nothing is left for a future to hold.
            metadatas = [await self._write(*x) for x in zip(leaves, leaf_infos, leaf_args)]
            await jax_array_handlers._async_serialize_shardings(  # the `_sharding` entries ArrayHandler writes
                [v.sharding for v in leaves], leaf_infos, primary_host=self._primary_host)
            if self._array_metadata_store is not None:  # the write shapes that `_METADATA` records
                await self._array_metadata_store.write(checkpoint_dir=leaf_infos[0].parent_dir,
                                                       array_metadatas=metadatas, process_index=jax.process_index())
        arrays = [x for x, s in zip(zip(values, infos, args), streamed) if not s]
        return await super().serialize(*(list(seq) for seq in zip(*arrays))) if arrays else []

    async def _write(self, leaf: StreamedLeaf, info: ocp.type_handlers.ParamInfo, arg: ocp.SaveArgs):
        await info.await_path_creation()
        shard = leaf.sharding.shard_shape(leaf.shape)
        # One stored chunk per block of a shard: every write fills whole chunks, none is read back or held.
        write_shape = (min(leaf.block_rows, shard[0]), *shard[1:])
        spec = tensorstore_utils.build_array_write_spec(
            info=info, arg=arg, global_shape=leaf.shape, local_shape=write_shape, dtype=leaf.dtype,
            use_ocdbt=info.is_ocdbt_checkpoint, metadata_key=self._metadata_key,
            process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint))
        if ocp.multihost.is_primary_host(self._primary_host):  # creates the array's metadata, as orbax does
            await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
        store = await ts.open(ts.Spec(spec.json), open=True, assume_metadata=True, context=info.ts_context)
        shards = _own_shards(leaf.sharding, leaf.shape)
        for start in range(0, leaf.shape[0], leaf.block_rows):
            stop = min(start + leaf.block_rows, leaf.shape[0])
            parts = [(max(s[0].start, start), min(s[0].stop, stop), s[1:]) for s in shards
                     if s[0].start < stop and s[0].stop > start]
            if parts:
                rows = leaf.read(start, stop)
                for lo, hi, rest in parts:
                    await store[(slice(lo, hi), *rest)].write(rows[(slice(lo - start, hi - start), *rest)])
        return spec.metadata


_HANDLER = _StreamingArrayHandler(array_metadata_store=array_metadata_store.Store())
# The default handlers, with jax.Array and StreamedLeaf both going to the one streaming handler.
REGISTRY = ocp.type_handlers.create_type_handler_registry(
    *((t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types() if t is not jax.Array),
    (jax.Array, _HANDLER), (StreamedLeaf, _HANDLER))


class StoredArray:
    """One array of an orbax pytree checkpoint, read a region at a time in place (orbax's own read spec)."""

    def __init__(self, metadata: ocp.metadata.ArrayMetadata, use_ocdbt: bool, use_zarr3: bool, context: ts.Context):
        self.shape = tuple(metadata.shape)
        self._info = ocp.type_handlers.ParamInfo(name=metadata.name, parent_dir=epath.Path(metadata.directory),
                                                 is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3, ts_context=context)

    @functools.cached_property
    def _store(self) -> ts.TensorStore:
        spec = ocp.type_handlers.get_json_tspec_read(self._info, use_ocdbt=self._info.is_ocdbt_checkpoint)
        return ts.open(ts.Spec(spec), open=True, read=True, context=self._info.ts_context).result()

    @property
    def chunk_rows(self) -> int:
        """Rows of axis 0 per stored chunk: reading a block of them decodes no chunk twice."""
        return self._store.chunk_layout.read_chunk.shape[0]

    def read(self, index: tuple[slice, ...] | slice = slice(None)) -> np.ndarray:
        return self._store[index].read().result()


def stored_arrays(directory: str) -> dict[str, StoredArray]:
    """`a/b/c` path -> StoredArray for every array leaf of the orbax pytree checkpoint `directory`."""
    path = epath.Path(directory)
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(path)
    context = tensorstore_utils.get_ts_context(use_ocdbt=use_ocdbt)
    leaves = traverse_util.flatten_dict(dict(metadata.tree), sep="/")
    return {k: StoredArray(v, use_ocdbt, metadata.use_zarr3, context) for k, v in leaves.items()
            if isinstance(v, ocp.metadata.ArrayMetadata)}
