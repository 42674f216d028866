"""Orbax checkpoints of the train state, the data-iterator state and the config; params-only checkpoints
(what an import writes and a run can start from)."""

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from vlm_jax.layers.lora import LORA_A, LORA_B
from vlm_jax.train import streaming


class Checkpointer:
    """Async, keep-N checkpoints under WORKDIR/checkpoints; restores onto any mesh."""

    def __init__(self, workdir: str, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, config_json: str) -> bool:
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json))), force=True)

    def restore(self, step: int, abstract_state, shardings) -> tuple:
        """(state, data_state) at `step`, with arrays placed by `shardings`."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out.state, out.data

    def item_dir(self, step: int, item: str) -> str:
        """The directory of item `item` (`state`, `data`, `config`) of the step-`step` checkpoint."""
        return str(ocp.step.standard_name_format().find_step(self.manager.directory, step).path / item)

    def read_config(self, step: int) -> dict:
        """The config a run saved with its step-`step` checkpoint (as a dict)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params) -> None:
    """A params-only checkpoint at `path` (synchronous: an import must not return before it is on disk). Leaves
    are arrays, or StreamedLeaf values written a block at a time (vlm_jax/train/streaming.py); either way they
    restore as arrays. The format is StandardCheckpointHandler's (which wraps this handler with the same limit on
    bytes in flight), with the default type handlers plus StreamedLeaf's."""
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
        raise ValueError(f"params checkpoint {path} holds {extra}, which the model does not have")
    wanted = [k for k in want
              if k.split("/", 1)[0] in held and (k in have or k.rsplit("/", 1)[-1] not in (LORA_A, LORA_B))]
    wrong = [f"{k}: checkpoint {have.get(k)}, model {tuple(want[k])}" for k in wanted if have.get(k) != tuple(want[k])]
    wrong += [f"{k}: checkpoint {have[k]}, model has none" for k in sorted(set(have) - set(want))]
    if wrong:
        raise ValueError(f"params checkpoint {path} does not fit the model:\n  " + "\n  ".join(wrong))
    return wanted


def restore_params(path: str, abstract_params, shardings):
    """The leaves `fit_params` picks from a `save_params` checkpoint, cast to `abstract_params`' dtypes and
    placed by `shardings`."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(os.path.abspath(path)).item_metadata
    want = traverse_util.flatten_dict(abstract_params, sep="/")
    where = traverse_util.flatten_dict(shardings, sep="/")
    have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(stored), sep="/").items()}
    keys = fit_params(path, have, {k: tuple(v.shape) for k, v in want.items()})
    target = traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(want[k].shape, want[k].dtype, sharding=where[k]) for k in keys}, sep="/")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.abspath(path), args=ocp.args.StandardRestore(target))
