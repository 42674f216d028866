"""Bad records (data.on_bad_record, data.max_bad_fraction, data.max_image_pixels): each kind of bad record is one
error naming the json file, the example's index and id and the reason, or with skip is left out, warned once and
counted in metrics.jsonl; images of every mode convert to the right RGB; vlm-check-data lists what a run would meet.
"""

import json
import logging
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from configs import base
from tests.helpers import ITEMS, ROOT, TINY, tiny_config
from vlm_jax.cli import check_data
from vlm_jax.config import set_key
from vlm_jax.data.images import DEFAULT_MAX_PIXELS, image_size, load_image, to_rgb
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax.data.pipeline import make_train_iterator, skipped_counts
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.errors import BadRecordError, InputError
from vlm_jax.train import loop

TOK = load_tokenizer("")
ASK = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"}]
# Each kind of bad record: (the record, how it is written into the file, the reason its error gives).
BAD = {
    "empty conversation": ({"id": "bad", "image": "imgs/a.png", "conversations": []}, None,
                           r"missing or empty 'conversations' list"),
    "missing answer": ({"id": "bad", "conversations": [{"from": "human", "value": "Say hi."}]}, None,
                       r"conversation ends with a 'human' turn"),
    "wrong roles": ({"id": "bad", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
                    None, r"turn 0 has role 'gpt', expected 'human'"),
    "marker count": ({"id": "bad", "image": "imgs/a.png", "conversations": [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "x"}]}, None,
        r"0 <image> markers but 1 images"),
    "not utf-8": ({"id": "bad", "conversations": [{"from": "human", "value": "Say hi."},
                                                   {"from": "gpt", "value": "h@i"}]}, (b"h@i", b"h\xffi"),
                  r"conversations\[1\]\.value holds the byte 0xff, which is not UTF-8 .* at character 1"),
    "lone surrogate": ({"id": "bad", "conversations": [{"from": "human", "value": "Say h@i."},
                                                        {"from": "gpt", "value": "hi"}]}, (b"h@i", b"h\\ud800i"),
                       r"conversations\[0\]\.value holds a lone surrogate \\ud800 at character 5"),
    "missing image": ({"id": "bad", "image": "imgs/gone.png", "conversations": ASK}, None,
                      r"image file not found: .*imgs/gone.png"),
    "corrupt image": ({"id": "bad", "image": "imgs/corrupt.png", "conversations": ASK}, None,
                      r"cannot decode image file .*imgs/corrupt.png"),
    "truncated image": ({"id": "bad", "image": "imgs/truncated.png", "conversations": ASK}, None,
                        r"cannot decode image file .*imgs/truncated.png"),
    "pixel limit": ({"id": "bad", "image": "imgs/big.png", "conversations": ASK}, None,
                    r"image file .*imgs/big.png is 200x150 = 30000 pixels, more than data.max_image_pixels=10000"),
}
LIMIT = 10000  # data.max_image_pixels of these tests: the good images are under it, big.png over


def write_images(root) -> None:
    (root / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (64, 40), (200, 30, 30)).save(root / "imgs" / "a.png")
    Image.new("RGB", (90, 90), (30, 30, 200)).save(root / "imgs" / "b.png")
    Image.new("RGB", (200, 150), (30, 200, 30)).save(root / "imgs" / "big.png")
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
    Image.fromarray(noise).save(root / "imgs" / "truncated.png")
    whole = (root / "imgs" / "truncated.png").read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not


def write_data(root, items: list, edits: list = ()) -> str:
    """`items` as root/data.json, each (old, new) of `edits` replacing bytes of the file; images in root/imgs."""
    write_images(root)
    raw = json.dumps(items).encode()
    for old, new in edits:
        raw = raw.replace(old, new)
    (root / "data.json").write_bytes(raw)
    return str(root / "data.json")


def data_config(path: str, *extra: str):
    """A small tiled llava_json config reading `path` (its iterator only: no model is built)."""
    c = base.get_config()
    c.batch_size = 2
    c.model.vision.patch_size = 8
    c.data.update(source="llava_json", path=path, seq_len=200, tile_size=32, max_tiles=4, max_tiles_per_row=10,
                  threads=1, max_image_pixels=LIMIT)
    for item in extra:
        key, _, value = item.partition("=")
        set_key(c, f"data.{key}", value)
    return c


def batches(config, n: int) -> tuple[list[dict], dict]:
    """The first n batches of `config`'s training stream, and its skipped counts after them."""
    it = make_train_iterator(config, TOK)
    try:
        return [next(it) for _ in range(n)], skipped_counts(it.get_state())
    finally:
        it.close()


@pytest.mark.parametrize("kind", BAD)
def test_each_bad_record_is_one_error_naming_file_index_id_and_reason(tmp_path, kind):
    item, edit, reason = BAD[kind]
    path = write_data(tmp_path, ITEMS + [item], [edit] if edit else [])
    with pytest.raises(InputError) as e:  # at load (structure, text) or when the stream reaches it
        batches(data_config(path), 4)
    message = str(e.value)
    assert isinstance(e.value, BadRecordError) and "\n" not in message
    assert re.fullmatch(rf"{re.escape(path)}: example 3 \(id bad\): {reason}.*", message), message


@pytest.mark.parametrize("kind", BAD)
def test_with_skip_each_bad_record_is_left_out_warned_once_and_counted(tmp_path, kind, caplog):
    item, edit, reason = BAD[kind]
    path = write_data(tmp_path, ITEMS + [item], [edit] if edit else [])
    config = data_config(path, "on_bad_record=skip", "max_bad_fraction=0.5", "epochs=2")
    with caplog.at_level(logging.WARNING):
        got, skipped = batches(config, 6)  # 2 epochs of 3 good examples; the rest of the stream is empty rows
    assert skipped == dict(bad_records=2, too_long_records=0)  # met once an epoch
    warned = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(warned) == 1 and re.search(rf"{re.escape(path)}: example 3 \(id bad\): {reason}", warned[0])
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in got) == 2 * len(ITEMS)  # every good example twice


def test_the_structure_of_a_kept_bad_record_raises_when_read(tmp_path):
    path = write_data(tmp_path, ITEMS + [BAD["empty conversation"][0]])
    with pytest.raises(BadRecordError, match=r"example 3 \(id bad\): missing or empty"):
        LlavaJsonSource(path)  # raise: refused at load
    kept = LlavaJsonSource(path, keep_bad=True)  # skip: kept, so indices and the shuffle stay the file's
    assert len(kept) == 4 and kept[2]["id"] == "txt-3"
    with pytest.raises(BadRecordError, match=r"example 3 \(id bad\): missing or empty"):
        kept.header(3)


def test_a_wrong_image_folder_stops_a_skipping_run_at_max_bad_fraction(tmp_path):
    items = [dict(ITEMS[0], id=f"cap-{i}") for i in range(20)] + [ITEMS[2]]
    path = write_data(tmp_path, items)
    config = data_config(path, "on_bad_record=skip", "max_bad_fraction=0.25", f"image_folder={tmp_path / 'wrong'}")
    with pytest.raises(InputError, match=r"6 bad records in the first 1 epoch\(s\) of a data shard of 21 examples, "
                                         r"more than data.max_bad_fraction=0.25 .*the last: .*image file not found"):
        batches(config, 3)


def test_json_syntax_errors_stay_fatal_naming_file_line_and_column(tmp_path):
    (tmp_path / "data.json").write_bytes(b'[{"id": "a",\n  "conversations": [}]')
    with pytest.raises(InputError, match=r"data.json: not valid JSON: .* line 2 column 21"):
        LlavaJsonSource(str(tmp_path / "data.json"), keep_bad=True)


def test_the_pixel_limit_reads_the_header_and_replaces_pils_own_check(tmp_path):
    # 100 million pixels, past PIL's default limit: refused from the header, naming the file and size.
    path = str(tmp_path / "bomb.png")
    Image.new("1", (10000, 10000)).save(path)
    assert DEFAULT_MAX_PIXELS == base.get_config().data.max_image_pixels == 89478485
    with pytest.raises(ValueError, match=r"bomb.png is 10000x10000 = 100000000 pixels, more than "
                                         r"data.max_image_pixels=89478485"):
        load_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        assert image_size(path, max_pixels=10 ** 8) == (10000, 10000)
        assert image_size(path, max_pixels=0) == (10000, 10000)


def _file(tmp_path, img: Image.Image, name: str, **save) -> Image.Image:
    img.save(tmp_path / name, **save)
    return load_image(str(tmp_path / name))


def test_images_of_every_mode_convert_to_the_right_rgb(tmp_path):
    grey16 = np.array([[0, 257 * 100, 65535, 32896]], np.uint16)  # -> 0, 100, 255, 128
    want = np.array([0, 100, 255, 128], np.uint8)
    png16 = _file(tmp_path, Image.fromarray(grey16), "grey16.png")
    assert png16.mode == "RGB" and (np.asarray(png16) == want[:, None]).all()
    big_endian = Image.frombytes("I;16B", (4, 1), grey16.astype(">u2").tobytes())
    assert (np.asarray(to_rgb(big_endian)) == want[:, None]).all()
    assert (np.asarray(to_rgb(Image.fromarray(grey16.astype(np.int32)))) == want[:, None]).all()
    # 32-bit float: PIL's reading, rounded and clipped to 0..255.
    floats = _file(tmp_path, Image.fromarray(np.array([[0.0, 100.4, 300.0, -5.0]], np.float32)), "f.tiff")
    assert (np.asarray(floats) == np.array([0, 100, 255, 0], np.uint8)[:, None]).all()
    # Palettes through their colours, with and without transparency (dropped, as LLaVA's convert("RGB") did).
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    colours = [[10, 20, 30], [200, 100, 50]]
    assert np.asarray(_file(tmp_path, palette, "p.png")).tolist() == [colours]
    assert np.asarray(_file(tmp_path, palette, "pt.png", transparency=1)).tolist() == [colours]
    assert np.asarray(_file(tmp_path, palette, "pts.png", transparency=b"\x00\x80")).tolist() == [colours]
    assert np.asarray(_file(tmp_path, Image.new("LA", (1, 1), (90, 0)), "la.png")).tolist() == [[[90, 90, 90]]]
    rgba = _file(tmp_path, Image.new("RGBA", (1, 1), (10, 20, 30, 0)), "rgba.png")
    assert np.asarray(rgba).tolist() == [[[10, 20, 30]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(_file(tmp_path, cmyk, "cmyk.tiff")).tolist() == np.asarray(cmyk.convert("RGB")).tolist() \
        == [[[255, 0, 0]]]
    # EXIF orientation 6 (turn a quarter clockwise): upright, its size as image_size reads it from the header.
    wide = Image.new("RGB", (4, 2), (0, 0, 0))
    wide.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = _file(tmp_path, wide, "exif.png", exif=exif.tobytes())
    assert upright.size == image_size(str(tmp_path / "exif.png")) == (2, 4)
    assert np.asarray(upright)[0, 1].tolist() == [255, 255, 255]  # the top-left pixel turned to the top right


def test_check_data_lists_bad_and_over_long_records_and_exits_1(tmp_path, capsys):
    long = {"id": "long", "conversations": [{"from": "human", "value": "Say hi."},
                                            {"from": "gpt", "value": " ".join(["hi"] * 300)}]}
    path = write_data(tmp_path, ITEMS + [BAD["truncated image"][0], long, BAD["not utf-8"][0]],
                      [BAD["not utf-8"][1]])
    argv = ["--config", os.path.join(ROOT, "configs/demo.py"), *(f"--config.{o}" for o in TINY),
            "--config.data.source=llava_json", f"--config.data.path={path}", "--config.data.threads=2"]
    with pytest.raises(SystemExit) as done:
        check_data.main(argv)
    assert done.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[:-1]) == sorted([
        f"bad (train): {path}: example 3 (id bad): cannot decode image file {tmp_path}/imgs/truncated.png: "
        "OSError: image file is truncated",
        f"bad (train): {path}: example 5 (id bad): conversations[1].value holds the byte 0xff, which is not UTF-8 "
        "(or a \\udcff escape) at character 1",
        f"too long (train): {path}: example 4 (id long): 914 tokens exceed data.seq_len 128"]), lines
    assert json.loads(lines[-1])["train"] == dict(records=6, bad=2, too_long=1, without_image=2)
    # The eval source is checked too when there is one; a clean dataset exits 0.
    (tmp_path / "clean").mkdir()
    clean = write_data(tmp_path / "clean", ITEMS)
    check_data.main(argv[:-2] + [f"--config.data.path={clean}", f"--config.data.eval_path={clean}"])
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["train"] == summary["eval"] == dict(records=3, bad=0, too_long=0, without_image=1)


def test_a_truncated_image_stops_vlm_train_in_one_line(tmp_path):
    path = write_data(tmp_path, ITEMS + [BAD["truncated image"][0]])
    command = [sys.executable, "-m", "vlm_jax.cli.train", "--config", os.path.join(ROOT, "configs/demo.py"),
               "--workdir", str(tmp_path / "run"), *(f"--config.{o}" for o in TINY), "--config.total_steps=2",
               "--config.data.source=llava_json", f"--config.data.path={path}"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: example 3 (id bad): cannot decode image file {tmp_path}/imgs/truncated.png: "
                      "OSError: image file is truncated"], run.stderr
    assert "Traceback" not in run.stderr


def test_with_skip_the_run_trains_on_and_counts_it(tmp_path):
    # 13 examples, one with a truncated image: the epoch count reads it from its header, training leaves it out.
    items = [dict(ITEMS[i % 2], id=f"ex-{i}") for i in range(12)] + [BAD["truncated image"][0]]
    path = write_data(tmp_path, items)
    # One bad record in 13 is more than the default data.max_bad_fraction (0.01) allows.
    config = tiny_config("data.source=llava_json", f"data.path={path}", "data.on_bad_record=skip",
                         "data.max_bad_fraction=0.1", "data.epochs=1", "total_steps=0")
    loop.train(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert len(metrics) >= 2 and metrics[-1]["bad_records"] == 1 and metrics[-1]["too_long_records"] == 0
    assert all(np.isfinite(m["loss"]) for m in metrics)  # the epoch's last rows end early: no NaN


@pytest.mark.parametrize("window", [0, 4])
def test_a_resumed_stream_counts_as_a_straight_one(tmp_path, window):
    items = [dict(ITEMS[i % 3], id=f"ex-{i}") for i in range(9)] + [BAD["missing image"][0], BAD["marker count"][0]]
    path = write_data(tmp_path, items)
    config = data_config(path, "on_bad_record=skip", "max_bad_fraction=0.5", f"pack_window={window}",
                         "skip_too_long=True", "seq_len=100")  # vqa-2's 5 views do not fit
    straight, states = make_train_iterator(config, TOK), []
    try:
        for _ in range(10):
            next(straight)
            states.append((straight.get_state(), skipped_counts(straight.get_state())))
    finally:
        straight.close()
    assert states[-1][1]["bad_records"] >= 4 and states[-1][1]["too_long_records"] >= 2  # over two epochs
    assert bool(window) == bool(states[6][0]["states"]["0"]["window_rows_done"])  # resumed within a window
    for k in (1, 6):
        resumed = make_train_iterator(config, TOK)
        try:
            resumed.set_state(states[k][0])
            for state, skipped in states[k + 1:]:
                next(resumed)
                assert (resumed.get_state(), skipped_counts(resumed.get_state())) == (state, skipped)
        finally:
            resumed.close()
    # A state saved before the counts existed counts from its position on.
    old = {"shards": 1, "states": {"0": {"next_index": 3, "window_rows_done": 0}}}
    resumed = make_train_iterator(config, TOK)
    resumed.set_state(old)
    assert skipped_counts(resumed.get_state()) == dict(bad_records=0, too_long_records=0)
    resumed.close()
