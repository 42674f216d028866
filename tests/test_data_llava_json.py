import json

import numpy as np
import pytest

from configs import base
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax.data.pipeline import make_eval_examples, make_train_iterator
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from vlm_jax.errors import BadRecordError, InputError
from tests.helpers import ITEMS, first_batch, write_dataset

TOK = load_tokenizer("")

def config(path, **data):
    c = base.get_config()
    c.batch_size = 2
    c.model.vision.patch_size = 8
    c.data.update(source="llava_json", path=str(path), template="vicuna_v1", seq_len=200, tile_size=32,
                  max_tiles=4, max_tiles_per_row=10, threads=1)
    c.data.update(**data)
    return c


def test_reads_records(tmp_path):
    write_dataset(tmp_path)
    src = LlavaJsonSource(str(tmp_path))  # folder -> folder/data.json
    assert len(src) == 3
    r0, r1, r2 = src[0], src[1], src[2]
    (image,) = r0["images"]
    assert r0["id"] == "cap-1" and image.size == (64, 40) and image.mode == "RGB"
    assert r0["conversations"] == [("human", "<image>\nGive a brief description of the image."),
                                   ("gpt", "a red square")]
    assert len(r1["conversations"]) == 4
    assert r2["images"] == [] and r2["conversations"][0] == ("human", "Say hi.")


def test_image_folder_and_json_path(tmp_path):
    json_file = write_dataset(tmp_path, name="train.json")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "train.json").write_text(json_file.read_text())
    src = LlavaJsonSource(str(other / "train.json"), image_folder=str(tmp_path))
    assert [im.size for im in src[1]["images"]] == [(90, 90)]


def test_pipeline_on_llava_json(tmp_path):
    write_dataset(tmp_path)
    c = config(tmp_path, eval_path=str(tmp_path / "data.json"))
    b = first_batch(c)
    image_id = special_ids(TOK).image
    # Greedy packing puts cap-1 + txt-3 in row 0 and vqa-2 in row 1: both images' tiles, once each.
    assert b["tile_mask"].sum() == 3 + 5  # 64x40 -> 2x1 grid + global; 90x90 -> 2x2 (max_tiles 4) + global
    assert (b["tokens"] == image_id).sum() == 8 * 16
    masked = [TOK.decode(b["targets"][r][b["loss_mask"][r] > 0].tolist()) for r in range(2)]
    assert sorted("".join(masked).split("</s>")) == sorted(["", " a red square", " a disc", " blue", " hi"])
    evals = make_eval_examples(c, TOK, 3)
    assert [e["answer"] for e in evals] == ["a red square", "blue", "hi"]
    assert len(evals[2]["tiles"]) == 0 and evals[2]["image_positions"].shape == (0,) and evals[2]["image"] is None
    assert TOK.decode(evals[1]["tokens"].tolist()).endswith("ASSISTANT: a disc</s>USER: Colour? ASSISTANT:")


def test_missing_and_corrupt_images_name_file_and_example(tmp_path):
    items = ITEMS + [{"id": "gone-4", "image": "imgs/missing.png", "conversations": ITEMS[0]["conversations"]},
                     {"id": "bad-5", "image": "imgs/bad.png", "conversations": ITEMS[0]["conversations"]}]
    write_dataset(tmp_path, items)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    src = LlavaJsonSource(str(tmp_path / "data.json"))
    with pytest.raises(BadRecordError, match=r"data.json: example 3 \(id gone-4\).*imgs/missing.png"):
        src[3]
    with pytest.raises(BadRecordError, match=r"data.json: example 4 \(id bad-5\).*imgs/bad.png"):
        src[4]
    # The same error reaches the trainer through the iterator.
    c = config(tmp_path)
    it = make_train_iterator(c, TOK)
    with pytest.raises(BadRecordError, match="id (gone-4|bad-5)"):
        for _ in range(5):
            next(it)


@pytest.mark.parametrize("item, match", [
    ({"id": "r1", "conversations": [{"from": "user", "value": "x"}, {"from": "gpt", "value": "y"}]},
     r"example 0 \(id r1\).*role 'user'"),
    ({"id": "r2"}, r"example 0 \(id r2\): missing or empty 'conversations'"),
    ({"id": "r3", "conversations": [{"value": "x"}]}, r"id r3.*'from' and 'value'"),
    ({"id": "r4", "image": 7, "conversations": [{"from": "human", "value": "x"}]}, r"id r4.*'image'"),
    ("not a dict", r"example 0: expected an object"),
])
def test_bad_records_name_file_and_example(tmp_path, item, match):
    (tmp_path / "d.json").write_text(json.dumps([item]))
    with pytest.raises(ValueError, match=match) as e:
        LlavaJsonSource(str(tmp_path / "d.json"))
    assert "d.json" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="nothing.json"):
        LlavaJsonSource(str(tmp_path / "nothing.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        LlavaJsonSource(str(tmp_path / "broken.json"))
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        LlavaJsonSource(str(tmp_path / "obj.json"))


def test_marker_count_mismatch_names_example(tmp_path):
    items = [{"id": "nomark", "image": "imgs/a.png",
              "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "x"}]}]
    write_dataset(tmp_path, items)
    c = config(tmp_path)
    with pytest.raises(BadRecordError, match=r"data.json: example 0 \(id nomark\): 0 <image> markers but 1 images"):
        first_batch(c)
    np.testing.assert_array_equal(np.asarray(LlavaJsonSource(str(tmp_path))[0]["images"][0])[0, 0], [200, 30, 30])
