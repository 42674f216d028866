"""Divergence: a step whose loss, gradient norm or updated parameters are not finite keeps its state; a run of
optim.max_skipped_steps such steps stops the training, and no checkpoint ever holds a non-finite value."""

import json
import re

import jax
import numpy as np
import pytest

from vlm_jax import parallel
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.train import loop
from vlm_jax.train.step import make_train_step
from tests.helpers import first_batch, tiny_config

NO_WARMUP = "optim.warmup_steps=0"


def poisoned(batch: dict) -> dict:
    return {**batch, "loss_mask": batch["loss_mask"] * np.float32("nan")}


def restored(config, workdir) -> dict:
    """Every checkpoint in `workdir`, step -> its TrainState on the host."""
    setup = loop.Setup(config)
    ckpt = Checkpointer(str(workdir), config.keep_checkpoints)
    try:
        return {s: jax.device_get(setup.restored_state(ckpt, s)[0]) for s in ckpt.all_steps()}
    finally:
        ckpt.close()


def skipped_steps(workdir) -> list[float]:
    return [json.loads(line)["skipped_steps"] for line in open(workdir / "metrics.jsonl")]


def assert_equal(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nan_batch_keeps_parameters_and_optimizer_state_with_micro_batches():
    """On the 8 devices, accumulating 2 micro-batches (the loop's runs below take one)."""
    config = tiny_config("batch_size=16", NO_WARMUP)
    setup = loop.Setup(config)
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, micro_batches=2)
    state = setup.fresh_state()
    before = jax.device_get(state)  # the step donates its input
    batch = first_batch(config)
    state, metrics = step(state, parallel.global_batch(poisoned(batch), setup.mesh))
    assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    skipped = jax.device_get(state)
    assert int(skipped.step) == 1  # the batch is consumed
    assert_equal((before.trainable, before.opt_state), (skipped.trainable, skipped.opt_state))
    state, metrics = step(state, parallel.global_batch(batch, setup.mesh))
    assert float(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), skipped.trainable, jax.device_get(state.trainable))
    assert all(jax.tree.leaves(moved))


def test_divergent_run_stops_and_every_checkpoint_is_finite(tmp_path, caplog):
    # At this rate Adam's first update overflows the parameters while the loss and gradients are finite.
    config = tiny_config("optim.lr=1e39", NO_WARMUP, "total_steps=8", "checkpoint_every=1", "keep_checkpoints=8",
                         "optim.max_skipped_steps=3")
    message = (f"3 steps in a row (optim.max_skipped_steps) skipped their update for a non-finite loss, gradient norm "
               f"or parameters, the last at step 3; the last checkpoint is step 2 in {tmp_path}")
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        loop.train(config, str(tmp_path))
    assert skipped_steps(tmp_path) == [1, 1, 1]
    warned = [r.getMessage() for r in caplog.records if "skipped its update" in r.getMessage()]
    assert warned == [f"step {s} skipped its update: non-finite loss, gradient norm or parameters ({s} in a row; "
                      "optim.max_skipped_steps=3 stops the run)" for s in (1, 2, 3)]
    saved = restored(config, tmp_path)
    assert sorted(saved) == [1, 2]
    fresh = jax.device_get(loop.Setup(config).fresh_state())
    for state in saved.values():
        assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))
        assert_equal(fresh.params, state.params)


def test_one_nan_batch_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    real = parallel.global_batch
    calls = []

    def global_batch(batch, mesh):
        calls.append(mesh)
        return real(poisoned(batch) if len(calls) == 2 else batch, mesh)

    monkeypatch.setattr(parallel, "global_batch", global_batch)
    config = tiny_config(NO_WARMUP, "total_steps=4", "checkpoint_every=1", "keep_checkpoints=4")
    loop.train(config, str(tmp_path))
    assert skipped_steps(tmp_path) == [0, 1, 0, 0]
    saved = restored(config, tmp_path)
    assert [int(saved[s].step) for s in sorted(saved)] == [1, 2, 3, 4]
    assert_equal((saved[1].trainable, saved[1].opt_state), (saved[2].trainable, saved[2].opt_state))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), saved[2].trainable, saved[3].trainable)
    assert all(jax.tree.leaves(moved))


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    """The step keeps NaN out of the state; the check before each save stops a run whose state has one anyway."""
    real = loop.make_train_step

    def make_train_step_poisoning_step_2(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == 2:
                state = state.replace(trainable=jax.tree.map(lambda x: x * np.float32("nan"), state.trainable))
            return state, metrics
        return run

    monkeypatch.setattr(loop, "make_train_step", make_train_step_poisoning_step_2)
    config = tiny_config("total_steps=4", "checkpoint_every=1")
    message = f"the state at step 2 holds non-finite values and was not saved; the last checkpoint is step 1 in {tmp_path}"
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        loop.train(config, str(tmp_path))
    assert sorted(restored(config, tmp_path)) == [1]


def test_max_skipped_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=re.escape("optim.max_skipped_steps=0 must be at least 1")):
        loop.train(tiny_config("optim.max_skipped_steps=0"), str(tmp_path))
