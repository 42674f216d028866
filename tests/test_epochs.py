"""data.epochs: the run's length counted from the rows the packer makes, every example seen once an epoch, the
warmup as a share of the counted run, and the combinations that make no epoch."""

import collections
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax.config import load_config
from vlm_jax.data.epochs import count_epochs, epoch_steps
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.pipeline import make_source, make_train_iterator
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.train import loop
from vlm_jax.train.optim import learning_rate_schedule
from tests.helpers import ROOT

TOK = load_tokenizer("")
# Images whose views (tiles) or patch grids (NaViT) differ, so examples cost rows differently.
SIZES = {"wide.png": (64, 40), "square.png": (90, 90), "tall.png": (30, 70)}


def write_data(root, n: int = 40) -> str:
    """A llava_json dataset of n examples, each with its own answer length (so its tokens name it), a quarter
    text-only and the rest with one of SIZES' images."""
    (root / "imgs").mkdir(exist_ok=True)
    for name, size in SIZES.items():
        Image.new("RGB", size, (40, 90, 200)).save(root / "imgs" / name)
    items = []
    for i in range(n):
        image = [None, *SIZES][i % 4]
        question = "What is it?" if image else "Say hi."
        item = {"id": f"ex-{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + question},
            {"from": "gpt", "value": " ".join(["hi"] * (1 + i))}]}
        if image:
            item["image"] = f"imgs/{image}"
        items.append(item)
    (root / "data.json").write_text(json.dumps(items))
    return str(root / "data.json")


def stage_config(system: str, path: str, *extra: str):
    """The tiny stage-2 recipe of `system` reading the llava_json file `path`, run by epochs."""
    return load_config(os.path.join(ROOT, "configs", f"{system}.py:stage2,tiny"), [
        "data.source=llava_json", f"data.path={path}", "data.seq_len=256", "data.epochs=1", "total_steps=0", *extra])


def example_ids(config) -> dict[bytes, str]:
    """Each training example's tokens -> its id (the examples' answers differ in length, so tokens name them)."""
    source = make_source(config, "train")
    footprint = data_kind(config.model).record_to_example(config, TOK).footprint
    ids = {footprint(source.header(i)).tokens.tobytes(): source.records[i]["id"] for i in range(len(source))}
    assert len(ids) == len(source)
    return ids


def rows_ids(batch: dict, ids: dict[bytes, str]) -> list[list[str]]:
    """The ids of the examples each row of `batch` holds."""
    out = []
    for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
        out.append([ids[tokens[segments == s].tobytes()] for s in range(1, segments.max() + 1)])
    return out


def stream_rows(config, steps: int) -> list[list[str]]:
    """Every row of `steps` batches, in order (one data shard), as the ids of its examples."""
    ids, it = example_ids(config), make_train_iterator(config, TOK)
    try:
        return [row for _ in range(steps) for row in rows_ids(next(it), ids)]
    finally:
        it.close()


CASES = {  # tiled rows packed greedily, tiled rows planned a window at a time, NaViT rows in groups of 2
    "tiles": ("sharegpt4v_7b", ()),
    "tiles_window": ("sharegpt4v_7b", ("data.pack_window=8",)),
    "navit_groups": ("points15_7b", ("data.pack_window=8",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_epoch_sees_every_example_once_then_stops(tmp_path, case):
    system, extra = CASES[case]
    config = stage_config(system, write_data(tmp_path), "batch_size=4", *extra)
    counts = count_epochs(config, TOK, [0])
    steps = epoch_steps(config, counts)
    group = 2 if system == "points15_7b" else 1  # make_tiny keeps points' groups, of 2 rows
    assert steps == -(-counts[0][0] * group // 4)  # ceil(rows / batch_size)
    rows = stream_rows(config, steps + 1)
    seen = [i for row in rows[:steps * 4] for i in row]
    assert sorted(seen) == sorted(f"ex-{i}" for i in range(40))
    used = [row for row in rows[:steps * 4] if row]
    assert len(used) > len(rows[:steps * 4]) - 4  # padding rows only in the last step...
    assert not any(rows[steps * 4:])  # ...and after it the stream has ended


@pytest.mark.parametrize("window", [0, 8])
def test_examples_too_long_to_fit_are_skipped_in_the_count_too(tmp_path, window):
    path = write_data(tmp_path)
    items = json.loads(open(path).read())
    items += [{"id": f"long-{i}", "conversations": [{"from": "human", "value": "Say hi."},
                                                    {"from": "gpt", "value": " ".join(["hi"] * (300 + i))}]}
              for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(items))
    config = stage_config("sharegpt4v_7b", path, "batch_size=4", "data.skip_too_long=True",
                          f"data.pack_window={window}")
    steps = epoch_steps(config, count_epochs(config, TOK, [0]))
    rows = stream_rows(config, steps + 1)
    assert sorted(i for row in rows[:steps * 4] for i in row) == sorted(f"ex-{i}" for i in range(40))
    assert len([row for row in rows[:steps * 4] if row]) > steps * 4 - 4 and not any(rows[steps * 4:])


def test_two_epochs_each_in_its_own_rows_in_a_fresh_order(tmp_path):
    config = stage_config("sharegpt4v_7b", write_data(tmp_path), "batch_size=4", "data.epochs=2",
                          "data.pack_window=8")
    counts = count_epochs(config, TOK, [0])
    steps = epoch_steps(config, counts)
    assert steps == -(-sum(counts[0]) // 4)
    rows = stream_rows(config, steps)
    first, second = rows[:counts[0][0]], rows[counts[0][0]:]
    every = sorted(f"ex-{i}" for i in range(40))
    assert sorted(i for row in first for i in row) == every
    assert sorted(i for row in second for i in row) == every
    assert [i for row in first for i in row] != [i for row in second for i in row]


def test_shards_each_count_their_own_epoch(tmp_path):
    """Two data shards pack their halves on their own; the run lasts as long as the longer one, and every
    example is in it once."""
    config = stage_config("sharegpt4v_7b", write_data(tmp_path, 41), "batch_size=4", "data.shards=2")
    counts = count_epochs(config, TOK, [0, 1])
    steps = epoch_steps(config, counts)
    assert steps == max(-(-c[0] // 2) for c in counts.values())
    ids, it = example_ids(config), make_train_iterator(config, TOK)
    seen = collections.Counter(i for _ in range(steps) for row in rows_ids(next(it), ids) for i in row)
    it.close()
    assert seen == collections.Counter(f"ex-{i}" for i in range(41))


def test_every_process_takes_the_length_of_all_shards(tmp_path, monkeypatch):
    """Two processes, each counting the data shard it builds, gather the counts and take the same length as one
    process counting both."""
    config = stage_config("sharegpt4v_7b", write_data(tmp_path, 41), "batch_size=4", "data.shards=2")
    whole = loop.with_epoch_length(config, TOK, [0, 1]).total_steps
    parts = [{str(s): c for s, c in count_epochs(config, TOK, [s]).items()} for s in (0, 1)]
    monkeypatch.setattr(loop, "allgather_json", lambda mine: parts)
    assert [loop.with_epoch_length(config, TOK, [s]).total_steps for s in (0, 1)] == [whole, whole]
    assert whole == epoch_steps(config, count_epochs(config, TOK, [0, 1]))


@pytest.mark.parametrize("system", ["sharegpt4v_7b", "points15_7b"])
@pytest.mark.parametrize("source", ["llava_json", "synthetic"])
def test_a_footprint_is_the_example_without_its_pixels(tmp_path, system, source):
    config = stage_config(system, write_data(tmp_path, 12), "data.num_train=12")
    config.data.source = source
    records, to_example = make_source(config, "train"), data_kind(config.model).record_to_example(config, TOK)
    for i in range(len(records)):
        real, footprint = to_example(records[i]), to_example.footprint(records.header(i))
        assert footprint.id == real.id
        np.testing.assert_array_equal(footprint.tokens, real.tokens)
        np.testing.assert_array_equal(footprint.loss, real.loss)
        if system == "points15_7b":
            assert [grid for _, grid in footprint.images] == [grid for _, grid in real.images]
            assert footprint.num_patches == real.num_patches
        else:
            assert len(footprint.tiles) == len(real.tiles)
            np.testing.assert_array_equal(footprint.tile_starts, real.tile_starts)


def test_counting_reads_image_headers_not_pixels(tmp_path, monkeypatch):
    config = stage_config("sharegpt4v_7b", write_data(tmp_path), "batch_size=4")

    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr("vlm_jax.data.llava_json.load_image", refuse)
    assert count_epochs(config, TOK, [0]) == count_epochs(config, TOK, [0])


def test_train_runs_the_counted_steps_with_the_warmup_a_share_of_them(tmp_path):
    path = write_data(tmp_path)
    config = stage_config("sharegpt4v_7b", path, "optim.warmup_steps=0", "optim.warmup_fraction=0.25")
    want = epoch_steps(config, count_epochs(config, TOK, [0]))
    assert want > 2
    workdir = tmp_path / "run"
    loop.train(config, str(workdir), stop_at=2)
    saved = loop.Checkpointer(str(workdir), 2)
    resolved = saved.read_config(2)
    saved.close()
    assert resolved.total_steps == want and resolved.optim.warmup_fraction == 0.25
    setup = loop.Setup(resolved, jax.devices()[:1])
    spec = setup.groups.specs["train"]
    schedule = learning_rate_schedule(spec, want)
    warmup = max(1, round(0.25 * want))
    assert float(schedule(warmup)) == pytest.approx(spec.lr) and float(schedule(warmup - 1)) < spec.lr
    # The data changed under the run: resuming would change its schedule.
    items = json.loads(open(path).read())
    (tmp_path / "data.json").write_text(json.dumps(items[:20]))
    with pytest.raises(ValueError, match=r"data.epochs=1 now counts \d+ steps, but the run .* was planned at "
                                         f"{want}: its data or packing settings changed"):
        loop.train(config, str(workdir))


def test_bad_epoch_settings_are_one_line_errors(tmp_path):
    path = write_data(tmp_path, 6)
    with pytest.raises(ValueError, match=r"data.epochs=-1: 0 \(run total_steps\) or the number of passes"):
        make_train_iterator(stage_config("sharegpt4v_7b", path, "data.epochs=-1"), TOK)
    with pytest.raises(ValueError, match=r"data.epochs=-1: 0 \(run total_steps\) or the number of passes"):
        count_epochs(stage_config("sharegpt4v_7b", path, "data.epochs=-1"), TOK, [0])
    with pytest.raises(ValueError, match="data.epochs=1 counts the run's steps, but total_steps=4 is set too: set "
                                         "total_steps=0, or data.epochs=0 for a run of total_steps"):
        count_epochs(stage_config("sharegpt4v_7b", path, "total_steps=4"), TOK, [0])
    small = stage_config("sharegpt4v_7b", path)  # 6 examples: 2 or 3 rows, a batch is 8
    with pytest.raises(ValueError, match=r"data.epochs=1: epoch 1 of the training data packs into \d rows, fewer "
                                         r"than one batch of batch_size=8"):
        epoch_steps(small, count_epochs(small, TOK, [0]))
    both = stage_config("sharegpt4v_7b", path, "optim.warmup_steps=10", "optim.warmup_fraction=0.03")
    with pytest.raises(ValueError, match="optim: warmup_steps=10 and warmup_fraction=0.03 both set"):
        loop.Setup(both, jax.devices()[:1])
    group = stage_config("sharegpt4v_7b", path, "optim.warmup_steps=0", "optim.warmup_fraction=0.03")
    group.optim.groups.update(train=dict(warmup_steps=5))
    with pytest.raises(ValueError, match="optim.groups.train: warmup_steps=5 and warmup_fraction=0.03 both set"):
        loop.Setup(group, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"optim: warmup_fraction=1.5 must be in \[0, 1\)"):
        loop.Setup(stage_config("sharegpt4v_7b", path, "optim.warmup_steps=0", "optim.warmup_fraction=1.5"),
                   jax.devices()[:1])


@pytest.mark.parametrize("system", ["sharegpt4v_7b", "sharegpt4v_13b", "points15_7b", "xverse_v_13b",
                                    "ziya_blip2_14b", "belle_vl"])
def test_stage_configs_train_one_epoch_with_warmup_a_share_of_it(system):
    for stage in ("stage1", "stage2"):
        real = load_config(os.path.join(ROOT, "configs", f"{system}.py:{stage}"))
        assert (real.data.epochs, real.total_steps, real.optim.warmup_fraction, real.optim.warmup_steps) == (
            1, 0, 0.03, 0)
        tiny = load_config(os.path.join(ROOT, "configs", f"{system}.py:{stage},tiny"))
        assert (tiny.data.epochs, tiny.total_steps, tiny.optim.warmup_steps, tiny.optim.warmup_fraction) == (
            0, 4, 1, 0.0)
