"""Orbax checkpoints of the train state, the data-iterator state and the config; params-only checkpoints
(what an import writes and a run can start from)."""

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from vlm_jax.layers.lora import LORA_A, LORA_B


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

    def read_config(self, step: int) -> dict:
        """The config a run saved with its step-`step` checkpoint (as a dict)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params) -> None:
    """A params-only checkpoint at `path` (synchronous: an import must not return before it is on disk)."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.StandardSave(params))


def _without(tree: dict, paths: list[str]) -> dict:
    leaves = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in leaves.items() if k not in paths}, sep="/")


def restore_params(path: str, abstract_params, shardings):
    """The top-level subtrees a `save_params` checkpoint holds (an imported LLM may have no vision tower),
    cast to `abstract_params`' dtypes and placed by `shardings`. Each leaf's shape must match the model's,
    else the error lists every mismatch; only LoRA adapter leaves may be absent (left out of the result)."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        stored = dict(ckptr.metadata(os.path.abspath(path)).item_metadata)
    extra = sorted(set(stored) - set(abstract_params))
    if extra:
        raise ValueError(f"params checkpoint {path} holds {extra}, which the model does not have")
    abstract_params = {k: abstract_params[k] for k in stored}
    shardings = {k: shardings[k] for k in stored}
    have = {k: v.shape for k, v in traverse_util.flatten_dict(stored, sep="/").items()}
    want = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()}
    # A base model's checkpoint has no LoRA adapters; they keep their fresh init (B = 0).
    new_adapters = [k for k in want if k not in have and k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)]
    if new_adapters:
        abstract_params, shardings = _without(abstract_params, new_adapters), _without(shardings, new_adapters)
        want = {k: v for k, v in want.items() if k not in new_adapters}
    wrong = [f"{k}: checkpoint {have.get(k)}, model {v}" for k, v in want.items() if have.get(k) != tuple(v)]
    if wrong:
        raise ValueError(f"params checkpoint {path} does not fit the model:\n  " + "\n  ".join(wrong))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.abspath(path), args=ocp.args.StandardRestore(target))
