"""Parameter-only checkpoints: what an import, a soup or the demo's vision pretraining writes and a run starts
from, and the parameters inside a train checkpoint, read without its optimizer state."""

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax.checkpoints import streaming
from vlm_jax.errors import InputError
from vlm_jax.layers.lora import LORA_A, LORA_B


def save_params(path: str, params) -> None:
    """A params-only checkpoint at `path` (synchronous: an import must not return before it is on disk). Leaves
    are arrays, or StreamedLeaf values written a block at a time (vlm_jax/checkpoints/streaming.py); either way
    they restore as arrays. The format is StandardCheckpointHandler's (which wraps this handler with the same
    limit on bytes in flight), with the default type handlers plus StreamedLeaf's."""
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, type_handler_registry=streaming.REGISTRY)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(params))


def fit_params(path: str, have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> list[str]:
    """The leaves of the model (`want`: flat `a/b` path -> shape) that a `save_params` checkpoint holding `have`
    gives: all of each top-level subtree it holds (an imported LLM may have no vision tower), of which only
    LoRA adapter leaves may be absent (a base model's checkpoint; they keep their fresh init, B = 0). Anything
    else that does not fit the model raises one error listing it."""
    held = {k.split("/", 1)[0] for k in have}
    extra = sorted(held - {k.split("/", 1)[0] for k in want})
    if extra:
        raise InputError(f"params checkpoint {path} holds {extra}, which the model does not have")
    wanted = [k for k in want
              if k.split("/", 1)[0] in held and (k in have or k.rsplit("/", 1)[-1] not in (LORA_A, LORA_B))]
    wrong = [f"{k}: checkpoint {have.get(k)}, model {tuple(want[k])}" for k in wanted if have.get(k) != tuple(want[k])]
    wrong += [f"{k}: checkpoint {have[k]}, model has none" for k in sorted(set(have) - set(want))]
    if wrong:
        raise InputError(f"params checkpoint {path} does not fit the model:\n  " + "\n  ".join(wrong))
    return wanted


def param_leaves(path: str, under: tuple[str, ...] = ()) -> dict[str, tuple[str, ocp.metadata.ArrayMetadata]]:
    """Flat model path -> (stored path, metadata) of the parameters in the orbax pytree checkpoint `path`: all
    of its arrays, or with `under` those of these top-level subtrees (a train checkpoint's `params`)."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        tree = ckptr.metadata(os.path.abspath(path)).item_metadata.tree
    out = {}
    for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items():
        top, _, rest = k.partition("/")
        if isinstance(v, ocp.metadata.ArrayMetadata) and (not under or top in under):
            out[rest if under else k] = k, v
    return out


def restore_params(path: str, abstract_params, shardings, under: tuple[str, ...] = (),
                   stored_dtypes: bool = False):
    """The leaves `fit_params` picks from the checkpoint `path` (the parameters `param_leaves(path, under)`
    finds), placed by `shardings` and cast to `abstract_params`' dtypes, or kept as stored with
    `stored_dtypes`. Nothing else in the checkpoint (a train state's optimizer state) is read."""
    stored = param_leaves(path, under)
    want = traverse_util.flatten_dict(abstract_params, sep="/")
    where = traverse_util.flatten_dict(shardings, sep="/")
    keys = fit_params(path, {k: tuple(m.shape) for k, (_, m) in stored.items()},
                      {k: tuple(v.shape) for k, v in want.items()})
    target = traverse_util.unflatten_dict({stored[k][0]: jax.ShapeDtypeStruct(
        want[k].shape, stored[k][1].dtype if stored_dtypes else want[k].dtype, sharding=where[k]) for k in keys},
        sep="/")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        out = ckptr.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    got = traverse_util.flatten_dict(out, sep="/")
    params = {k: got[stored[k][0]] for k in keys}
    bad = non_finite(params)
    if bad:
        raise InputError(f"params checkpoint {path} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s): "
                         + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
    return traverse_util.unflatten_dict(params, sep="/")


def non_finite(arrays: dict[str, jax.Array]) -> list[str]:
    """The names of the floating-point arrays (each placed on one mesh, as restored) holding a NaN or Inf."""
    names = [k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating)]
    if not names:
        return []
    mesh = arrays[names[0]].sharding.mesh
    flags = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]),
                    out_shardings=NamedSharding(mesh, PartitionSpec()))([arrays[k] for k in names])
    return [k for k, ok in zip(names, jax.device_get(flags)) if not ok]
