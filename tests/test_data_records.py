"""Records of several images (interleaved markers), JSONL files and images given as encoded bytes, through both
image-input kinds' packing."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.images import image_size, load_image
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from vlm_jax.errors import BadRecordError, InputError
from tests.helpers import first_batch, tiny_config
from tests.test_packing import navit_config

TOK = load_tokenizer("")
IMAGE_ID = special_ids(TOK).image


def conv(*texts: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


MULTI = [
    # LLaVA-OneVision style: several markers in one turn stay where they are.
    {"id": "two-1", "image": ["imgs/a.png", "imgs/b.png"], "conversations": conv("Compare <image> and <image>.",
                                                                                 "red and blue")},
    # One image a turn: each turn's single marker moves to the front of its turn (LLaVA-NeXT).
    {"id": "turns-2", "image": ["imgs/c.jpg", "imgs/a.png"],
     "conversations": conv("What is this <image>?", "green", "And <image>", "red")},
    {"id": "one-3", "image": "imgs/b.png", "conversations": conv("Describe.\n<image>", "a disc")},
    {"id": "txt-4", "conversations": conv("Say hi.", "hi")},
    {"id": "empty-5", "image": [], "conversations": conv("Say bye.", "bye")},
]
SIZES = {"imgs/a.png": (64, 40), "imgs/b.png": (90, 90), "imgs/c.jpg": (48, 48)}
ANSWERS = ["red and blue", "green", "red", "a disc", "hi", "bye"]


def write_images(root) -> None:
    (root / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (64, 40), (200, 30, 30)).save(root / "imgs" / "a.png")
    Image.new("P", (90, 90), 3).save(root / "imgs" / "b.png")  # a palette image: converted to RGB on reading
    Image.new("RGB", (48, 48), (30, 200, 30)).save(root / "imgs" / "c.jpg", quality=90)


def write_multi(root, items=MULTI, name="data.json"):
    """`items` as a .json list or, for a name ending .jsonl, one a line; with the images they name."""
    write_images(root)
    text = "\n".join(json.dumps(item) for item in items) if name.endswith(".jsonl") else json.dumps(items)
    (root / name).write_text(text)
    return root / name


def config_for(make_config, path, *extra):
    """One epoch of the data at `path` (the rows after it empty) in a batch of 4 rows."""
    return make_config("data.source=llava_json", f"data.path={path}", "data.max_tiles_per_row=12",
                       "data.max_tiles=4", "data.seq_len=320", "batch_size=4", "data.threads=1", "data.epochs=1",
                       "total_steps=0", *extra)


@pytest.mark.parametrize("name", ["data.json", "train.jsonl"])
def test_multi_image_records_and_marker_placement(tmp_path, name):
    src = LlavaJsonSource(str(write_multi(tmp_path, name=name)))
    assert len(src) == 5
    assert [r["images"] for r in src.records] == [("imgs/a.png", "imgs/b.png"), ("imgs/c.jpg", "imgs/a.png"),
                                                  ("imgs/b.png",), (), ()]
    assert src.records[0]["conversations"][0] == ("human", "Compare <image> and <image>.")
    assert [t for _, t in src.records[1]["conversations"]] == ["<image>\nWhat is this ?", "green", "<image>\nAnd",
                                                                "red"]
    assert src.records[2]["conversations"][0] == ("human", "<image>\nDescribe.")
    for i, item in enumerate(MULTI):
        want = [SIZES[p] for p in ([item["image"]] if isinstance(item.get("image"), str) else item.get("image", []))]
        assert src.header(i)["images"] == want
        images = src[i]["images"]
        assert [im.size for im in images] == want and all(im.mode == "RGB" for im in images)


def test_marker_count_must_equal_the_images_of_a_multi_image_record(tmp_path):
    items = MULTI[:1] + [{"id": "short-9", "image": ["imgs/a.png", "imgs/b.png"],
                          "conversations": conv("<image> alone", "x")}]
    path = write_multi(tmp_path, items, "train.jsonl")
    with pytest.raises(BadRecordError) as e:
        LlavaJsonSource(str(path))
    assert str(e.value) == (f"{path}: line 2 (id short-9): 1 <image> markers for 2 images (a record of several "
                            "images needs one marker per image, in image order)")
    src = LlavaJsonSource(str(path), keep_bad=True)  # kept in place, raised when read
    with pytest.raises(BadRecordError, match="line 2 .id short-9.: 1 <image> markers"):
        src[1]


def test_jsonl_errors_name_the_line(tmp_path):
    write_images(tmp_path)
    good = json.dumps(MULTI[3])
    (tmp_path / "broken.jsonl").write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl: line 3: not valid JSON"):
        LlavaJsonSource(str(tmp_path / "broken.jsonl"))
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{json.dumps({'id': 'no-conv'})}\n{good}\n")
    src = LlavaJsonSource(str(tmp_path / "bad.jsonl"), keep_bad=True)
    assert len(src) == 3 and src[2]["id"] == "txt-4"
    with pytest.raises(BadRecordError, match=r"bad.jsonl: line 3 \(id no-conv\): missing or empty"):
        src[1]
    assert src.where(2) == f"{tmp_path / 'bad.jsonl'}: line 4 (id txt-4)"


def test_image_from_bytes_is_read_as_from_its_file(tmp_path):
    write_images(tmp_path)
    for name in SIZES:
        path = str(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        from_file, from_bytes = load_image(path), load_image(data, name="imgs/x of record 7")
        assert from_bytes.mode == "RGB" and from_bytes.size == SIZES[name]
        np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(from_file))
        assert image_size(data) == image_size(path) == SIZES[name]
    # An EXIF orientation that turns the image a quarter: upright from the bytes too, size from the header.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (10, 20, 30)).save(buffer, "JPEG", exif=exif)
    assert image_size(buffer.getvalue()) == (24, 40) and load_image(buffer.getvalue()).size == (24, 40)
    # The pixel limit from the header and decoding errors name the image as given, not a path.
    with pytest.raises(ValueError, match=r"^image a.png of rec-1 is 64x40 = 2560 pixels, more than "
                                         r"data.max_image_pixels=2000"):
        load_image((tmp_path / "imgs/a.png").read_bytes(), 2000, "a.png of rec-1")
    with pytest.raises(ValueError, match=r"^cannot decode image a.png of rec-2: "):
        load_image((tmp_path / "imgs/a.png").read_bytes()[:60], name="a.png of rec-2")
    with pytest.raises(ValueError, match=r"^cannot decode image junk: UnidentifiedImageError"):
        image_size(b"not an image", name="junk")


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml", "qwen2_vl", "qwen_vl", "ziya", "xverse"])
def test_tiled_rows_hold_every_view_of_every_image(tmp_path, template):
    config = config_for(tiny_config, write_multi(tmp_path), f"data.template={template}")
    batch = first_batch(config, TOK)
    # Views (global + a 2x1 or 2x2 grid, data.max_tiles 4) of a 64x40, 90x90, 48x48 (1x1 global only): per record
    # 3 + 5, 1 + 3, 5.
    assert batch["tile_mask"].sum() == 8 + 4 + 5
    per_tile = tokens_per_tile(config.model, config.data.tile_size)
    assert (batch["tokens"] == IMAGE_ID).sum() == (batch["image_dest"] < config.data.seq_len).sum() == 17 * per_tile
    text = "".join(TOK.decode(batch["targets"][r][batch["loss_mask"][r] > 0].tolist()) for r in range(4))
    assert all(answer in text for answer in ANSWERS)


def test_plain_template_refuses_several_images(tmp_path):
    config = config_for(tiny_config, write_multi(tmp_path, MULTI[:1]), "data.template=plain")
    with pytest.raises(BadRecordError, match=r"example 0 \(id two-1\): template 'plain' takes exactly one image"):
        first_batch(config, TOK)


@pytest.mark.parametrize("extra", [(), ("data.vision_group_rows=2",)], ids=["rows", "grouped"])
def test_navit_rows_hold_every_image_within_the_image_budget(tmp_path, extra):
    config = config_for(navit_config, write_multi(tmp_path), "data.max_images_per_row=3", *extra)
    src = LlavaJsonSource(str(tmp_path))
    batch = first_batch(config, TOK)
    merge = config.model.connector.merge_size
    # Every image's patches are in the batch once, each a patch segment of its own; no row holds more than 3.
    segments = [len(set(row[row > 0].tolist())) for row in batch["patch_segment_ids"]]
    assert sum(segments) == sum(len(r["images"]) for r in src.records) == 5
    if not extra:
        assert max(segments) <= 3
    assert (batch["tokens"] == IMAGE_ID).sum() == (batch["patch_segment_ids"] > 0).sum() // merge ** 2
    text = "".join(TOK.decode(batch["targets"][r][batch["loss_mask"][r] > 0].tolist()) for r in range(4))
    assert all(answer in text for answer in ANSWERS)


def test_eval_examples_keep_the_first_image_and_all_of_them(tmp_path):
    path = write_multi(tmp_path)
    config = config_for(tiny_config, path, f"data.eval_path={path}")
    evals = make_eval_examples(config, TOK, 5)
    assert [len(e["raw_images"]) for e in evals] == [2, 2, 1, 0, 0]
    assert evals[0]["image"] is evals[0]["raw_images"][0] and evals[3]["image"] is None
    assert evals[0]["image"].size == (64, 40) and len(evals[0]["tiles"]) == 8
    assert evals[1]["question"] == "And" and evals[1]["answer"] == "red"


@pytest.mark.parametrize("make_config, budget, cost", [
    (tiny_config, "data.max_tiles_per_row=7", "8 tiles exceed data.max_tiles_per_row 7"),
    (navit_config, "data.max_images_per_row=1", "2 images exceed data.max_images_per_row 1"),
], ids=["tiles", "patches"])
def test_a_record_whose_images_overflow_a_row_is_named(tmp_path, make_config, budget, cost):
    config = config_for(make_config, write_multi(tmp_path, MULTI[:1] + MULTI[3:4]), budget)
    with pytest.raises(InputError, match=rf"two-1.*{cost}"):
        first_batch(config, TOK)
