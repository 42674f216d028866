"""vlm_jax/checkpoints: the train state saved as parameters plus optimizer state, read back without a trainer,
and workdirs saved in the older {trainable, frozen} layout still resuming, exporting and starting runs."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from tests.helpers import ROOT, tiny_config
from vlm_jax import parallel
from vlm_jax.checkpoints.directory import load_params, open_params
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.train import loop

FROZEN_BF16 = ("optim.trainable=[('vision/.*', 'frozen'), ('.*', 'train')]", "model.frozen_param_dtype=bfloat16",
               "model.connector.in_norm=False")


@flax.struct.dataclass
class OldTrainState:
    """The train state as workdirs saved it before the `params` layout: the trainer's two halves."""

    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: dict


def stored_tree(workdir: str, step: int) -> dict:
    ckpt = Checkpointer(workdir, keep=10)
    try:
        path = ckpt.item_dir(step, "state")
    finally:
        ckpt.close()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return dict(ckptr.metadata(path).item_metadata.tree)


def write_old_layout(src: str, dst: str, step: int, config) -> None:
    """`dst` holds `src`'s step-`step` checkpoint as the older layout saved it (orbax directly)."""
    setup = loop.Setup(config)
    ckpt = Checkpointer(src, keep=10)
    try:
        state, data_state = setup.restored_state(ckpt, step)
        saved_config = ckpt.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    finally:
        ckpt.close()
    old = OldTrainState(step=state.step, trainable=state.trainable, frozen=state.frozen, opt_state=state.opt_state)
    with ocp.CheckpointManager(os.path.abspath(os.path.join(dst, "checkpoints"))) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                                   data=ocp.args.JsonSave(data_state),
                                                   config=ocp.args.JsonSave(saved_config)))
        manager.wait_until_finished()


def assert_same_flat(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_checkpoints_and_interop_load_without_the_trainer():
    code = ("import sys\n"
            "import vlm_jax.checkpoints.directory, vlm_jax.checkpoints.workdir, vlm_jax.interop.hf_export\n"
            "import vlm_jax.interop.hf_import, vlm_jax.soup\n"
            "print(sorted(m for m in sys.modules if m.startswith(('vlm_jax.train', 'grain'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_state_saved_as_params_and_old_layout_still_resumes_loads_and_starts_runs(tmp_path):
    config = tiny_config("total_steps=4", "checkpoint_every=2", *FROZEN_BF16)
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    loop.train(config, new, stop_at=2)

    # The whole parameter tree in one subtree, each leaf in the dtype the trainer holds it in.
    tree = stored_tree(new, 2)
    assert set(tree) == {"step", "params", "opt_state"}
    dtypes = {k: v.dtype for k, v in traverse_util.flatten_dict(tree["params"], sep="/").items()}
    assert {d for k, d in dtypes.items() if k.startswith("vision/")} == {np.dtype("bfloat16")}
    assert {d for k, d in dtypes.items() if not k.startswith("vision/")} == {np.dtype("float32")}

    write_old_layout(new, old, 2, config)
    assert {"trainable", "frozen"} <= set(stored_tree(old, 2))

    # Read without a trainer (export, soup): the same arrays, in the dtypes they were saved in.
    mesh = parallel.make_mesh(config.mesh)
    (got, old_meta), (want, new_meta) = load_params(old, mesh), load_params(new, mesh)
    assert_same_flat(got, want)
    assert {k: v.dtype for k, v in want.items()} == dtypes and old_meta["parts"] == new_meta["parts"]
    (stored_old, _), (stored_new, _) = open_params(old), open_params(new)
    assert_same_flat({k: stored_old.get(k) for k in stored_old.shapes},
                     {k: stored_new.get(k) for k in stored_new.shapes})

    # Starting a run from either (`init_params`) gives the same state.
    setup = loop.Setup(config)
    assert_same_flat(traverse_util.flatten_dict(setup.imported_state(old).params, sep="/"),
                     traverse_util.flatten_dict(setup.imported_state(new).params, sep="/"))

    # Resuming either trains the same steps 3 and 4, bit for bit, and the old workdir's next save has the new layout.
    resumed_new, resumed_old = loop.train(config, new), loop.train(config, old)
    assert_same_flat(traverse_util.flatten_dict(jax.device_get(resumed_old.params), sep="/"),
                     traverse_util.flatten_dict(jax.device_get(resumed_new.params), sep="/"))
    assert set(stored_tree(old, 4)) == {"step", "params", "opt_state"}
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(w, "metrics.jsonl"))][-2:] for w in (new, old)]
    assert losses[0] == losses[1]
