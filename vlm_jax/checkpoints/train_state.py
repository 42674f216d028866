"""Orbax checkpoints of a training workdir: the train state, the data-iterator state and the config.

The train state is saved as `{step, params, opt_state}` with `params` the whole parameter tree (trained leaves
in model.param_dtype, frozen ones in model.frozen_param_dtype), so whatever reads parameters back needs neither
the freeze rules nor the optimizer. Workdirs written before this layout hold the parameters as the two subtrees
`trainable` and `frozen` (disjoint: a partly trained layer stack sits whole in `trainable`); they restore
through the same calls."""

import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from vlm_jax.checkpoints.params_only import param_leaves
from vlm_jax.config import upgrade_config
from vlm_jax.errors import InputError

PARAMS = ("params",)
# Where orbax moves a checkpoint past keep_checkpoints, in one rename, before it is deleted: deleted in place, file by
# file, a process killed meanwhile would leave a torn checkpoint under a step's name.
TRASH = "deleted"
SPLIT_PARAMS = ("trainable", "frozen")  # the layout before PARAMS: the trainer's two halves


def _drop_failed_read_reports() -> None:
    """Keeps the reads a failed restore left in flight from printing a traceback each after the error that explains
    them: orbax closes the event loop of the restore when one read fails, and each read still under way ends on
    tensorstore's threads, failing on the same file or into the closed loop, reported through sys.unraisablehook
    or as asyncio's "Task exception was never retrieved". Those reports (a closed loop, or an exception raised in
    orbax's code) are dropped, and asyncio's log with them; every other report still goes to the hook installed
    before."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "drops_failed_reads", False):
        return

    def from_orbax(tb) -> bool:
        return any(os.sep + "orbax" + os.sep in frame.filename for frame in traceback.extract_tb(tb))

    def hook(report) -> None:
        closed = report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"
        if not (closed or from_orbax(report.exc_traceback)):
            previous(report)

    hook.drops_failed_reads = True
    sys.unraisablehook = hook


class Checkpointer:
    """Async, keep-N checkpoints under WORKDIR/checkpoints; restores onto any mesh. The checkpoint past N that
    a save moves into checkpoints/deleted/ when it finishes is deleted there by the next save, or by `close`."""

    def __init__(self, workdir: str, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                                 todelete_subdir=TRASH))
        self.saved = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict, config_json: str) -> bool:
        """Saves `state` = {step, params, opt_state} with the data-iterator state and the config."""
        if self.manager.latest_step() == step:
            return False
        self.saved = True
        started = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json))), force=True)
        self.empty_trash()  # orbax's save waits for the previous one, which moved the checkpoint past N out
        return started

    def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, dict]:
        """(state, data_state) at `step`: `state` = {step, params, opt_state} shaped like `abstract_state`,
        with arrays placed by `shardings`, from either layout."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        layout = self.params_layout(step)
        if layout != PARAMS:  # the same leaves, each under the subtree it was saved in
            params = traverse_util.flatten_dict(target.pop("params"), sep="/")
            saved_in = {k: path.split("/", 1)[0]
                        for k, (path, _) in param_leaves(self.item_dir(step, "state"), layout).items()}
            if set(params) != set(saved_in):
                raise InputError(f"checkpoint {step} in {self.manager.directory} holds other parameters than the "
                                 f"model: {sorted(set(params) ^ set(saved_in))}")
            target.update({top: traverse_util.unflatten_dict(
                {k: v for k, v in params.items() if saved_in[k] == top}, sep="/") for top in layout})
        with self._reading(step):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        state = dict(out.state)
        if layout != PARAMS:
            state["params"] = traverse_util.unflatten_dict(
                {k: v for top in layout for k, v in traverse_util.flatten_dict(state.pop(top), sep="/").items()},
                sep="/")
        return state, out.data

    def params_layout(self, step: int) -> tuple[str, ...]:
        """The top-level subtrees of the step-`step` train state that hold the parameters."""
        # The item's handler alone: orbax's Checkpointer.metadata also looks for a step's metadata file inside the
        # item directory, and warns on every call that there is none.
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.item_dir(step, "state")))
        except (FileNotFoundError, NotImplementedError, ValueError, TypeError) as e:  # what that call tolerates
            raise self._corrupt(step, f"its state's tree metadata cannot be read: {e}") from None
        tops = set(metadata.tree)
        if set(PARAMS) <= tops:
            return PARAMS
        if tops & set(SPLIT_PARAMS):  # an empty subtree (nothing frozen) may not have been written
            return tuple(t for t in SPLIT_PARAMS if t in tops)
        raise InputError(f"checkpoint {step} in {self.manager.directory} holds {sorted(tops)}, not a vlm_jax "
                         "train state")

    def item_dir(self, step: int, item: str) -> str:
        """The directory of item `item` (`state`, `data`, `config`) of the step-`step` checkpoint."""
        return str(ocp.step.standard_name_format().find_step(self.manager.directory, step).path / item)

    def read_config(self, step: int) -> ml_collections.ConfigDict:
        """The config a run saved with its step-`step` checkpoint."""
        with self._reading(step):
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        return upgrade_config(saved)

    def _corrupt(self, step: int, why: str) -> InputError:
        earlier = [s for s in self.all_steps() if s < step]
        way_out = (f"delete {self.item_dir(step, '')} to resume from step {earlier[-1]} (earlier checkpoints: "
                   f"{earlier})" if earlier else "no earlier checkpoint is held: start again in a new workdir")
        return InputError(f"checkpoint {step} in {self.manager.directory} is corrupt ({why}); {way_out}")

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Turns what orbax raises on a truncated or garbled file of the step-`step` checkpoint into one error
        naming the checkpoint: a JSON item (config, data) that does not parse, or an array read that fails,
        which orbax's serialization.py wraps in a bare Exception around tensorstore's ValueError (naming the
        array and the file)."""
        try:
            yield
        except json.JSONDecodeError as e:
            raise self._corrupt(step, f"a JSON item does not parse: {e}") from None
        except Exception as e:
            if type(e) is not Exception or not isinstance(e.__cause__, ValueError):
                raise
            _drop_failed_read_reports()
            raise self._corrupt(step, str(e.__cause__).splitlines()[0]) from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def empty_trash(self) -> None:
        """Deletes the checkpoints orbax has moved out (process 0 moves them). A save still finishing may move
        another in meanwhile: it stays for the next time."""
        trash = os.path.join(self.manager.directory, TRASH)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self.saved:
            self.empty_trash()
