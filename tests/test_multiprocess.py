"""Multi-process training: a step's batch depends on the config (data.shards), never on the process count.

Two processes of four CPU devices each (spawned on localhost) train the tiny demo step for step as one process of
eight does, write each output once, and leave checkpoints that restore on one process, on another mesh, and
resume there with the same data stream. Without spawning: the shards' rows make up the batch however processes
split them. (Whether a command calls `jax.distributed.initialize()`: tests/test_cli.py.)"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from tests.helpers import ROOT, TINY, tiny_config
from tests.multiprocess_train import recording_global_batch
from tests.test_packing import TOK, navit_config
from vlm_jax import parallel
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.data.pipeline import make_train_iterator, merge_shard_states, shards_holding
from vlm_jax.train import loop
from vlm_jax.train.metrics import read_metrics

# 2 rows a device on fsdp 4 x tensor 2: process 0 holds rows 0-3 (shards 0, 1), process 1 rows 4-7 (shards 2, 3).
RUN = ("total_steps=4", "checkpoint_every=2", "data.shards=4", "data.pack_window=32", "mesh.data=1", "mesh.fsdp=4",
       "mesh.tensor=2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(workdir: str) -> list[tuple[subprocess.Popen, str]]:
    """tests/multiprocess_train.py as 2 processes x 4 CPU devices: (process, log path) of each. Run as a module
    from the repository root, it imports this checkout's vlm_jax whether or not the package is installed."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "tests.multiprocess_train", "--config",
               os.path.join(ROOT, "configs/demo.py"), "--workdir", workdir, "--coordinator_address",
               f"localhost:{free_port()}", "--num_processes", "2"] + [f"--config.{o}" for o in TINY + list(RUN)]
    started = []
    for i in range(2):
        log = os.path.join(os.path.dirname(workdir), f"process{i}.log")
        with open(log, "w") as out:
            started.append((subprocess.Popen(command + ["--process_id", str(i)], env=env, cwd=ROOT, stdout=out,
                                             stderr=subprocess.STDOUT), log))
    return started


def wait_for(started: list[tuple[subprocess.Popen, str]], timeout: float = 240) -> None:
    """Waits for every process; fails the test with the end of their logs unless all exit 0 in time."""
    codes = []
    try:
        for p, _ in started:
            codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        codes += ["timed out"] * (len(started) - len(codes))
    finally:
        for p, _ in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0] * len(started):
        tails = [open(log).read()[-3000:] for _, log in started]
        pytest.fail("\n\n".join(f"process {i}: {c}\n{t}" for i, (c, t) in enumerate(zip(codes, tails))))


def train_here(workdir: str) -> list[str]:
    """Trains RUN in this process (8 devices) into `workdir`; the digests of its steps' global batches."""
    digests = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "global_batch", recording_global_batch(digests))
        loop.train(tiny_config(*RUN), workdir)
    return digests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(workdir of the 2-process run, workdir of the same config trained by this one process of 8 devices, the
    digests of its batches). This process's runs share a compilation cache: the resumed run compiles nothing."""
    two, one = str(tmp_path_factory.mktemp("two") / "run"), str(tmp_path_factory.mktemp("one") / "run")
    started = start_two_processes(two)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
    try:
        try:
            digests = train_here(one)
        finally:
            wait_for(started, timeout=240)
        yield two, one, digests
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss_tokens"] for r in got] == [r["loss_tokens"] for r in want]  # the same rows, step for step
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=0, atol=1e-5)


def test_two_processes_train_the_one_process_batches_and_write_once(runs):
    two, one, digests = runs
    assert len(set(digests)) == 4 and json.load(open(os.path.join(two, "batch_digests.json"))) == digests
    records = read_metrics(two)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_same_steps(records, read_metrics(one))
    assert len(os.listdir(os.path.join(two, "tensorboard"))) == 1
    assert os.path.getsize(os.path.join(two, "loss.png")) > 0
    assert json.load(open(os.path.join(two, "param_groups.json")))


def restored_params(workdir: str, step: int, *mesh: str) -> tuple[dict, dict]:
    """(flat params, data-iterator state) of the step-`step` checkpoint, restored by this process onto `mesh`."""
    setup = loop.Setup(tiny_config(*RUN, *mesh))
    ckpt = Checkpointer(workdir, keep=10)
    try:
        state, data_state = setup.restored_state(ckpt, step)
    finally:
        ckpt.close()
    return traverse_util.flatten_dict(jax.device_get(state.params), sep="/"), data_state


def test_two_process_checkpoint_restores_on_one_process_on_any_mesh_and_resumes_the_stream(runs, tmp_path):
    two, one, digests = runs
    final = dict(np.load(os.path.join(two, "final_params.npz")))
    for mesh in ((), ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")):
        params, data_state = restored_params(two, 4, *mesh)
        assert params.keys() == final.keys()
        for k in final:
            np.testing.assert_array_equal(params[k], final[k], err_msg=k)
    assert data_state["shards"] == 4 and sorted(data_state["states"]) == ["0", "1", "2", "3"]
    # One process resumes the 2-process run from its step-2 checkpoint and trains the same steps 3 and 4.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    assert train_here(resumed) == digests[2:]
    assert_same_steps(read_metrics(resumed), read_metrics(one))


def test_shards_split_between_processes_make_up_the_whole_batch_and_its_state():
    for config in (tiny_config("data.shards=4", "data.pack_window=16"),
                   navit_config("batch_size=8", "data.vision_group_rows=2", "data.pack_window=9", "data.shards=2")):
        shards = config.data.shards
        whole = make_train_iterator(config, TOK)
        parts = [make_train_iterator(config, TOK, [s]) for s in range(shards // 2)] + [
            make_train_iterator(config, TOK, list(range(shards // 2, shards)))]
        for _ in range(3):
            want, got = next(whole), [next(p) for p in parts]
            for k in want:
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)
        state = merge_shard_states([p.get_state() for p in parts])
        assert state == whole.get_state()
        # Any division of the shards resumes from the state: here one iterator of them all, and the upper half.
        again, half = make_train_iterator(config, TOK), make_train_iterator(config, TOK, list(parts[-1].iterators))
        again.set_state(state)
        half.set_state(state)
        want, got, upper = next(whole), next(again), next(half)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
            np.testing.assert_array_equal(upper[k], want[k][len(want[k]) - len(upper[k]):], err_msg=k)
        for it in (whole, again, half, *parts):
            it.close()
    with pytest.raises(ValueError, match="no data iterator holds data shards \\[1\\]"):
        merge_shard_states([make_train_iterator(tiny_config("data.shards=2"), TOK, [0]).get_state()])
    with pytest.raises(ValueError, match="data.shards=8 cuts batch_size 8 into shards of 1 rows, not whole groups"):
        make_train_iterator(navit_config("batch_size=8", "data.vision_group_rows=2", "data.pack_window=9",
                                         "data.shards=8"), TOK)


def test_a_state_saved_before_data_shards_resumes_one_process_runs_only():
    config = tiny_config("data.pack_window=16")
    it = make_train_iterator(config, TOK)
    next(it)
    state = it.get_state()
    want = next(it)
    legacy = make_train_iterator(config, TOK)
    legacy.set_state({**state["states"]["0"], "process_index": 0, "process_count": 1})
    got = next(legacy)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match="2-process run from before data.shards"):
        legacy.set_state({**state["states"]["0"], "process_index": 1, "process_count": 2})
    it.close()
    legacy.close()


def test_a_process_builds_the_whole_shards_of_its_rows_or_names_data_shards():
    config = tiny_config("data.shards=4")  # batch_size 8: shards of 2 rows
    assert shards_holding(config, [(0, 2), (2, 4)]) == [0, 1]
    assert shards_holding(config, [(2, 4), (6, 8), (2, 4)]) == [1, 3]  # replicas of a row range count once
    assert loop.process_shards(config, loop.Setup(config).mesh) == [0, 1, 2, 3]  # this one process holds all
    with pytest.raises(ValueError, match="data.shards=4 .* process 1 of 8 holds rows 1-1, not whole shards"):
        shards_holding(config, [(1, 2)], "process 1 of 8")
    # 4 processes of 2 rows each cannot hold whole shards of 4 rows.
    with pytest.raises(ValueError, match="data.shards=2 cuts the batch of 8 rows into shards of 4, .* rows 2-3"):
        shards_holding(tiny_config("data.shards=2"), [(2, 4)])
