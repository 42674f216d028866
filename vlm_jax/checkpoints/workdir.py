"""A training workdir's parameters (`WORKDIR[@STEP]`: its latest checkpoint, or step STEP), restored or read in
place from the parameters of its train state, for the model config saved with them: no trainer, no freeze
rules, and the optimizer state is never read."""

import dataclasses
import os

import jax
import ml_collections
from jax.sharding import Mesh

from vlm_jax.checkpoints.params_only import param_leaves, restore_params
from vlm_jax.checkpoints.streaming import StoredArray, stored_arrays
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.errors import InputError
from vlm_jax.params import abstract_params, flat, param_shardings, unflat


def is_workdir(src: str) -> bool:
    """Whether `src` names a training `WORKDIR[@STEP]`."""
    return os.path.isdir(os.path.join(src.partition("@")[0], "checkpoints"))


@dataclasses.dataclass(frozen=True)
class WorkdirCheckpoint:
    """One checkpoint of a workdir: its train-state directory, the subtrees of it that hold the parameters
    (train_state.PARAMS, or the older layout's), the config the run saved and its step."""

    state_dir: str
    layout: tuple[str, ...]
    config: ml_collections.ConfigDict
    step: int


def open_workdir(src: str) -> WorkdirCheckpoint:
    """The checkpoint `WORKDIR@STEP` names, or the workdir's latest."""
    workdir, _, step = src.partition("@")
    ckpt = Checkpointer(workdir, keep=1 << 30)
    try:
        step = int(step) if step else ckpt.latest_step()
        if step not in ckpt.all_steps():
            raise InputError(f"{workdir} has no checkpoint {step} (have {ckpt.all_steps()})")
        return WorkdirCheckpoint(ckpt.item_dir(step, "state"), ckpt.params_layout(step), ckpt.read_config(step),
                                 step)
    finally:
        ckpt.close()


def restore_workdir_params(src: str, abstract_params_tree, shardings, stored_dtypes: bool = False) -> dict:
    """The parameters of `WORKDIR[@STEP]` for a model given by its abstract parameter tree and shardings, as
    `params_only.restore_params` fits them (a model with LoRA leaves the run had none of keeps those fresh)."""
    ckpt = open_workdir(src)
    return restore_params(ckpt.state_dir, abstract_params_tree, shardings, ckpt.layout, stored_dtypes)


def workdir_params(src: str, mesh: Mesh) -> tuple[dict[str, jax.Array], ml_collections.ConfigDict]:
    """(flat `a/b` path -> array in the dtype it was saved in, config) of `WORKDIR[@STEP]`, placed on `mesh` by
    the saved model's logical shardings."""
    ckpt = open_workdir(src)
    parts = tuple(sorted({k.split("/", 1)[0] for k in param_leaves(ckpt.state_dir, ckpt.layout)}))
    model = ckpt.config.model
    params = restore_params(ckpt.state_dir, unflat(abstract_params(model, parts)),
                            unflat(param_shardings(model, parts, mesh)), ckpt.layout, stored_dtypes=True)
    return flat(params), ckpt.config


def workdir_stored_params(src: str) -> tuple[dict[str, StoredArray], ml_collections.ConfigDict]:
    """(flat `a/b` path -> StoredArray, config) of the parameters of `WORKDIR[@STEP]`, to read in place: nothing
    is restored."""
    ckpt = open_workdir(src)
    arrays = stored_arrays(ckpt.state_dir)
    split = (k.partition("/") for k in arrays)
    return {rest: arrays[f"{top}/{rest}"] for top, _, rest in split if top in ckpt.layout}, ckpt.config
