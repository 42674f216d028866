"""data.workers: examples computed in grain worker processes give the batches, states and losses of examples computed
in the trainer's threads (data.workers=0); a run resumes under another worker count; a worker's failure is an error
in the trainer, not a hang."""

import gc
import json
import os
import pickle
import threading

import grain
import numpy as np
import pytest

from vlm_jax.data.epochs import count_epochs, epoch_steps
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.feeds import DataWorkerError
from vlm_jax.data.pipeline import (PackedBatchIterator, ReadExample, make_example_dataset, make_source,
                                   make_train_iterator, row_layout, shard_rows)
from vlm_jax.train import loop
from tests.helpers import assert_bitwise_equal, tiny_config
from tests.test_epochs import TOK, stage_config, write_data

# Tiled rows packed greedily (LLaVA's CLIP tiles, padded to square), NaViT rows planned in groups of 2 over windows
# of 8 examples (POINTS1.5's, whose state carries examples from window to window).
KINDS = {"tiles": ("sharegpt4v_7b", ()), "navit_groups": ("points15_7b", ("data.pack_window=8",))}


def data_with_a_bad_record(root) -> str:
    """write_data's 14 examples and one whose image is missing (bad only when read, as in training)."""
    path = write_data(root, 14)
    items = json.loads(open(path).read())
    items.insert(5, {"id": "missing-image", "image": "imgs/nowhere.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                       {"from": "gpt", "value": "a disc"}]})
    (root / "data.json").write_text(json.dumps(items))
    return path


def kind_config(root, kind: str, *extra: str):
    system, more = KINDS[kind]
    return stage_config(system, data_with_a_bad_record(root), "batch_size=4", "data.epochs=2",
                        "data.on_bad_record=skip", "data.max_bad_fraction=0.2", *more, *extra)


def read(config, workers: int, steps: int, state: dict | None = None) -> tuple[list[dict], dict]:
    """`steps` batches of one data shard from `state` (None: the start) with `workers` worker processes, and the
    state after them."""
    config = config.copy_and_resolve_references()
    config.data.workers = workers
    it = make_train_iterator(config, TOK)
    try:
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(steps)], it.get_state()
    finally:
        it.close()


def assert_same_batches(want: list[dict], got: list[dict]) -> None:
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], strict=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_workers_give_the_batches_of_in_process_reading(tmp_path, kind):
    """Both epochs to the end of the stream: the bad record skipped in each, each epoch packed on its own, then
    empty rows."""
    config = kind_config(tmp_path, kind)
    steps = epoch_steps(config, count_epochs(config, TOK, [0]))
    want, state = read(config, 0, steps + 1)
    got, got_state = read(config, 2, steps + 1)
    assert_same_batches(want, got)
    assert got_state == state and state["states"]["0"]["bad_records"] == 2  # once an epoch
    assert not want[-1]["segment_ids"].any()  # after the second epoch the stream has ended


def test_a_state_moves_between_worker_counts(tmp_path):
    """A state saved with 2 workers continues in-process exactly, and one saved in-process continues with 2
    workers, in a worker pipeline restarted at the new position. Grouped NaViT rows, one group a batch, saved
    mid-window with examples carried into it: every part of the state."""
    config = kind_config(tmp_path, "navit_groups", "data.epochs=0", "total_steps=100", "batch_size=2",
                         "data.seq_len=128")
    straight, _ = read(config, 0, 9)
    config.data.workers = 2
    it = make_train_iterator(config, TOK)
    try:
        first = [next(it) for _ in range(5)]
        saved = it.get_state()["states"]["0"]
        assert saved["window_rows_done"] and saved["carried"]
        then, state = read(config, 0, 2, it.get_state())
        it.set_state(state)  # the running workers stop; new ones start at the new position
        rest = [next(it) for _ in range(2)]
    finally:
        it.close()
    assert_same_batches(straight, first + then + rest)


def test_count_units_with_workers_counts_as_in_process(tmp_path):
    """count_units starts its workers at the epoch it counts (here the second), as data/epochs.py would."""
    config = kind_config(tmp_path, "navit_groups")
    examples, d = make_example_dataset(config, TOK), config.data
    n = len(examples)

    def units(workers: int) -> tuple[int, tuple[int, int]]:
        packer = PackedBatchIterator(examples, rows=shard_rows(config), layout=row_layout(config),
                                     window=d.pack_window, skip_bad=True, max_bad_fraction=d.max_bad_fraction,
                                     workers=workers, epoch_size=n, stop=2 * n)
        return packer.count_units(n, 2 * n, (1, 0))

    counted = units(0)
    assert counted[0] > 0 and counted[1] == (2, 0)  # the second epoch's bad record counted on top of the first's
    assert units(2) == counted


def test_losses_equal_with_workers_and_across_a_resume_that_changes_them(tmp_path):
    """A run reading with 2 worker processes, checkpointed and resumed reading in-process, trains to the state and
    losses of a run reading in-process throughout."""
    straight = loop.train(tiny_config("total_steps=4", "checkpoint_every=2"), str(tmp_path / "straight"))
    loop.train(tiny_config("total_steps=4", "checkpoint_every=2", "data.workers=2"), str(tmp_path / "switched"),
               stop_at=2)
    switched = loop.train(tiny_config("total_steps=4", "checkpoint_every=2"), str(tmp_path / "switched"))
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / w / "metrics.jsonl")]
              for w in ("straight", "switched")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert_bitwise_equal(straight, switched)


class Failing:
    """Stream index -> `read(index)`, except at `at`: an exception (a bug, not a bad record), or with `exit` the
    worker process dies."""

    def __init__(self, read, at: int, exit: bool = False):
        self.read, self.at, self.exit = read, at, exit

    def __call__(self, index: int):
        if index == self.at:
            if self.exit:
                os._exit(3)
            raise ZeroDivisionError("boom in the conversion")
        return self.read(index)


def failing_packer(at: int, workers: int, exit: bool = False) -> PackedBatchIterator:
    config = tiny_config()
    source = make_source(config, "train")
    read = ReadExample(source, data_kind(config.model).record_to_example(config, TOK))
    examples = grain.MapDataset.range(len(source)).map(Failing(read, at, exit))
    return PackedBatchIterator(examples, rows=8, layout=row_layout(config), workers=workers)


def next_within(it, seconds: float):
    """next(it), failing the test if it takes longer than `seconds` (a hang) instead of waiting forever."""
    out = {}

    def run():
        try:
            out["batch"] = next(it)
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() still waiting after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["batch"]


def test_an_exception_in_a_worker_is_an_error_naming_it():
    it = failing_packer(at=9, workers=2)
    try:
        with pytest.raises(DataWorkerError, match=r"failed on example 9 of its data shard's stream: "
                                                  r"ZeroDivisionError: boom in the conversion(.|\n)*in __call__"):
            for _ in range(10):
                next_within(it, 60)
    finally:
        it.close()
    # The caught error's traceback holds the examples grain had opened (in reference cycles): collected now, their
    # shared memory is freed before the session ends rather than by multiprocessing's resource tracker after it.
    gc.collect()
    it = failing_packer(at=9, workers=0)  # in-process, the exception itself
    try:
        with pytest.raises(ZeroDivisionError, match="boom in the conversion"):
            for _ in range(10):
                next_within(it, 60)
    finally:
        it.close()


def test_a_worker_that_dies_is_an_error():
    it = failing_packer(at=9, workers=1, exit=True)
    try:
        with pytest.raises(RuntimeError, match="Worker process was terminated unexpectedly with exit code 3"):
            for _ in range(10):
                next_within(it, 60)
    finally:
        it.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_what_the_workers_get_pickles(tmp_path, kind):
    """The example stream as grain sends it to each worker (source with its bad record, tokenizer, image
    processor, conversion) pickles into one that reads the same examples."""
    config = kind_config(tmp_path, kind)
    examples = make_example_dataset(config, TOK)
    copy = pickle.loads(pickle.dumps(examples))
    for i in range(len(examples)):
        a, b = examples[i], copy[i]
        assert type(a) is type(b)
        if hasattr(a, "error"):  # the bad record, named alike
            assert str(a.error) == str(b.error) and "missing-image" in str(a.error)
            continue
        assert a.id == b.id and pickle.dumps(a) == pickle.dumps(b)  # every array equal
