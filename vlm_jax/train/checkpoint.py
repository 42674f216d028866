"""Orbax checkpoints of the train state, the data-iterator state and the config; params-only checkpoints
(what an import writes and a run can start from)."""

import json
import os

import jax
import orbax.checkpoint as ocp


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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params) -> None:
    """A params-only checkpoint at `path` (synchronous: an import must not return before it is on disk)."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.StandardSave(params))


def restore_params(path: str, abstract_params, shardings):
    """Params from `save_params`, cast to `abstract_params`' dtypes and placed by `shardings`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.abspath(path), args=ocp.args.StandardRestore(target))
