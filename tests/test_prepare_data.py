"""vlm-prepare-data: LLaVA-format records with their encoded images into array_record shards, read back by
data.source=array_record."""

import json
import math
import pickle

import numpy as np
import pytest

from vlm_jax.cli import check_data, prepare_data
from vlm_jax.data.array_records import ArrayRecordSource, decode_record
from vlm_jax.data.epochs import count_epochs
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax import parallel
from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.train import loop
from vlm_jax.train.step import make_train_step
from tests.helpers import tiny_config
from tests.test_data_records import MULTI, conv, write_multi
from tests.test_packing import navit_config

TOK = load_tokenizer("")
BAD = [{"id": "gone-6", "image": "imgs/gone.png", "conversations": conv("<image>\nWhat?", "x")},
       {"id": "short-7", "image": ["imgs/a.png", "imgs/b.png"], "conversations": conv("<image> only", "y")}]


def config(*extra):
    return tiny_config("data.max_tiles=4", "data.max_tiles_per_row=12", "data.seq_len=320", *extra)


def test_round_trip_keeps_every_record_and_image_byte(tmp_path):
    long = {"id": "long-8", "conversations": conv("Count.", " ".join(["one two three"] * 15))}
    items = MULTI[:2] + BAD[:1] + MULTI[2:] + BAD[1:] + [long]
    src = write_multi(tmp_path, items, "train.jsonl")
    c = config("data.seq_len=48")
    meta = prepare_data.prepare(c, TOK, str(src), str(tmp_path / "out"), shards=2, skip_bad=True, progress=False)
    files = ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files + [".prepare", "metadata.json"])
    assert json.loads((tmp_path / "out" / "metadata.json").read_text()) == meta
    # Shard 0: source records 0-3 (the third is bad), shard 1: records 4-7 (the third is bad).
    assert meta["shards"] == [dict(file=files[0], records=3, images=5, text_only=0),
                              dict(file=files[1], records=3, images=0, text_only=3)]
    assert (meta["records"], meta["images"], meta["text_only"], meta["bad"]) == (6, 5, 3, 2)
    assert [(b["file"], b["index"], b["id"]) for b in meta["bad_records"]] == [(str(src), 2, "gone-6"),
                                                                             (str(src), 6, "short-7")]
    assert meta["bad_records"][0]["reason"] == f"image file not found: {tmp_path / 'imgs/gone.png'}"
    assert meta["bad_records"][1]["reason"].startswith("1 <image> markers for 2 images")

    json_src, good = LlavaJsonSource(str(src), keep_bad=True), [0, 1, 3, 4, 5, 7]
    footprint = data_kind(c.model).record_to_example(c, TOK).footprint
    lengths = [len(footprint(json_src.header(i))) for i in good]
    bins = [max(64, 2 ** math.ceil(math.log2(n))) for n in lengths]  # each length's bin: up to 64, 128, ...
    histogram = [[up_to, bins.count(up_to)] for up_to in (64 * 2 ** k for k in range(8)) if up_to <= max(bins)]
    assert meta["token_lengths"] == dict(template="vicuna_v1", image_inputs="tiles", seq_len=48, max=max(lengths),
                                         over_seq_len=sum(n > 48 for n in lengths), histogram=histogram)
    assert 128 < max(lengths) <= 256 and len(histogram) == 3 and sum(n for _, n in histogram) == 6
    assert 0 < meta["token_lengths"]["over_seq_len"] < 6

    shards = ArrayRecordSource(str(tmp_path / "out"))
    assert len(shards) == 6
    for k, i in enumerate(good):
        want = json_src.parsed(i)
        header, blobs = decode_record(shards.data[k])
        assert blobs == [(tmp_path / path).read_bytes() for path in want["images"]]  # the files' bytes, as they are
        got = shards[k]
        assert {key: got[key] for key in ("id", "conversations", "qtype")} == {
            key: want[key] for key in ("id", "conversations", "qtype")}
        for a, b in zip(got["images"], json_src[i]["images"], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert shards.header(k) == json_src.header(i)
    assert shards.where(3) == f"{tmp_path / 'out' / files[1]}: record 0 (id txt-4)"
    # Pickled (into a grain worker) it is a few paths and counts, and reads the same there.
    data = pickle.dumps(shards)
    assert len(data) < 4000 and pickle.loads(data)[1]["id"] == "turns-2"


def test_bad_record_stops_with_one_line_naming_it(tmp_path, capsys):
    src = write_multi(tmp_path, MULTI[:1] + BAD[1:])
    argv = ["--src", str(src), "--dst", str(tmp_path / "out"), "--no_progress", "--config", "configs/demo.py"]
    with pytest.raises(SystemExit) as done:
        prepare_data.main(argv)
    assert done.value.code == 1
    err = capsys.readouterr().err  # the log lines, then the error: one line, no traceback
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"error: {src}: example 1 (id short-7): 1 <image> markers for 2 images (a record of several images needs one "
        "marker per image, in image order) (--skip_bad leaves bad records out)")
    prepare_data.main(argv + ["--skip_bad"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == dict(records=1, images=2, text_only=0,
                                                                                  bad=1)


class Killed(Exception):
    """The process stopping midway (pytest keeps KeyboardInterrupt for itself)."""


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = str(write_multi(tmp_path, MULTI))
    c = config()
    prepare_data.prepare(c, TOK, src, str(tmp_path / "whole"), shards=3, progress=False, threads=2)
    entry, calls, kill_at = prepare_data._entry, [], [4]

    def interrupted(source, index, *args):
        calls.append(index)
        if index in kill_at:  # shard 2 holds records 3 and 4: killed after writing record 3, once
            kill_at.clear()
            raise Killed
        return entry(source, index, *args)

    monkeypatch.setattr(prepare_data, "_entry", interrupted)
    with pytest.raises(Killed):
        prepare_data.prepare(c, TOK, src, str(tmp_path / "resumed"), shards=3, progress=False)
    out = tmp_path / "resumed"
    assert (out / "data-00002-of-00003.array_record.partial").is_file()
    assert not (out / "data-00002-of-00003.array_record").exists() and not (out / "metadata.json").exists()
    calls.clear()
    prepare_data.prepare(c, TOK, src, str(out), shards=3, progress=False)
    assert calls == [3, 4]  # the finished shards are not read again
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.is_file())
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == whole and len(whole) == 4
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # Another shard count is another preparation: it starts over rather than mixing the two.
    calls.clear()
    prepare_data.prepare(c, TOK, src, str(out), shards=3, skip_bad=True, progress=False)
    assert calls == [0, 1, 2, 3, 4]


def test_shards_count_epochs_and_check_as_their_json(tmp_path, capsys):
    """data/epochs.py counts the same rows from the shards' headers as from the json's, and vlm-check-data reads
    the shards as it reads the json."""
    src = write_multi(tmp_path, MULTI * 4)
    extra = ["data.epochs=1", "total_steps=0", "batch_size=2"]
    from_json = config(f"data.path={src}", "data.source=llava_json", *extra)
    prepare_data.prepare(from_json, TOK, str(src), str(tmp_path / "shards"), shards=3, progress=False)
    from_shards = config(f"data.path={tmp_path / 'shards'}", "data.source=array_record", *extra)
    assert count_epochs(from_shards, TOK, [0]) == count_epochs(from_json, TOK, [0])
    summaries = []
    for source, path in (("llava_json", src), ("array_record", tmp_path / "shards")):
        check_data.main(["--config", "configs/demo.py", f"--config.data.source={source}", f"--config.data.path={path}",
                         f"--config.data.eval_path={path}", "--config.data.max_tiles_per_row=12",
                         "--config.data.seq_len=320"])
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert summaries[0]["train"] == summaries[1]["train"] == dict(records=20, bad=0, too_long=0, without_image=8)
    assert summaries[0]["eval"] == summaries[1]["eval"]


def train(setup, step, config, steps: int = 2) -> tuple[list[dict], list[float]]:
    """The first `steps` batches of `config`'s data and the losses of training on them from a fresh state."""
    state, batches, losses = setup.fresh_state(), [], []
    it = make_train_iterator(config, TOK)
    try:
        for _ in range(steps):
            batches.append(next(it))
            state, metrics = step(state, parallel.global_batch(batches[-1], setup.mesh))
            losses.append(float(metrics["loss"]))
    finally:
        it.close()
    return batches, losses


@pytest.mark.parametrize("make_config", [config, navit_config], ids=["tiles", "patches"])
def test_same_losses_from_json_and_from_shards(tmp_path, make_config):
    """The same LLaVA-format data (several images a record, text-only ones among them) trains to the same losses
    from its JSON and from its array_record shards, read in-process and by two worker processes."""
    src = write_multi(tmp_path, MULTI * 3)
    from_json = make_config("data.source=llava_json", f"data.path={src}", "data.seq_len=320")
    prepare_data.prepare(from_json, TOK, str(src), str(tmp_path / "shards"), shards=2, progress=False)
    setup = loop.Setup(from_json)
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
    want_batches, want = train(setup, step, from_json)
    assert (want_batches[0]["tokens"] > 0).sum() > 0 and all(np.isfinite(want))
    for workers in (0, 2):
        from_shards = make_config("data.source=array_record", f"data.path={tmp_path / 'shards'}", "data.seq_len=320",
                                  f"data.workers={workers}")
        got_batches, got = train(setup, step, from_shards)
        for a, b in zip(want_batches, got_batches, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert got == want
