"""vlm_jax.benchmarks: VLMEvalKit-style TSV files, prompts, circular rotations, option matching, VQA scoring."""

import base64
import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.benchmarks import (circular_rotations, exact_match, extract_option, load_images, mc_prompt,
                                normalize_vqa_answer, questions, read_tsv, records, score, vqa_accuracy, vqa_prompt)
from vlm_jax.benchmarks import tsv
from vlm_jax.errors import InputError

MC_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def png_b64(color: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    assert len(text) > 64  # longer than an image reference
    return text


def write_tsv(path, header: list[str], rows: list[list]) -> str:
    """As pandas' DataFrame.to_csv(sep="\\t") writes it: cells quoted only when they hold a tab, quote or newline."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[str(c) for c in row] for row in rows])
    return str(path)


def mc_file(tmp_path) -> str:
    red, blue = png_b64((255, 0, 0)), png_b64((0, 0, 255), (10, 20))
    return write_tsv(tmp_path / "mmb.tsv", MC_HEADER, [
        [1, "What colour is it?", "Look closely.\nAt the middle.", "red", "green", "blue", "black", "A",
         "colour", "perception", red],
        [2, "Which shape?", "nan", "circle", "square", "triangle", "", "C", "shape", "perception", "1"],
        [3, "Is it blue?", "", "yes", "no", "", "", "A", "colour", "reasoning", blue],
    ])


def test_read_tsv_mc(tmp_path):
    rows = read_tsv(mc_file(tmp_path))
    assert [r.index for r in rows] == [1, 2, 3]
    first, second, third = rows
    assert first.hint == "Look closely.\nAt the middle."  # a quoted cell with a newline
    assert first.options == dict(A="red", B="green", C="blue", D="black")
    assert second.hint is None and third.hint is None  # "nan" and empty are no hint
    assert second.options == dict(A="circle", B="square", C="triangle")
    assert third.options == dict(A="yes", B="no")
    assert [r.answer for r in rows] == ["A", "C", "A"]
    assert [(r.category, r.l2_category) for r in rows] == [
        ("colour", "perception"), ("shape", "perception"), ("colour", "reasoning")]
    assert second.images == first.images  # "1": the image of the row of index 1
    images = load_images(second)
    assert len(images) == 1 and images[0].mode == "RGB" and images[0].size == (16, 12)
    assert images[0].getpixel((3, 3)) == (255, 0, 0)
    assert load_images(third)[0].getpixel((0, 0)) == (0, 0, 255)
    assert third.where.endswith("mmb.tsv line 5")  # the first row's hint spans lines 2 and 3
    assert all(r.group is None and r.rotation == 0 for r in rows)


def test_read_tsv_large_image_and_paths(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    big = base64.b64encode(buf.getvalue()).decode()
    assert len(big) > 131072  # past the csv module's default field limit
    os.makedirs(tmp_path / "imgs")
    Image.new("RGB", (5, 7), (0, 255, 0)).save(tmp_path / "imgs" / "g.png")
    path = write_tsv(tmp_path / "vqa.tsv", ["index", "question", "answer", "image", "image_path"], [
        [10, "What is it?", "['two', '2', 'Two', 'a pair']", big, ""],
        [11, "Colour?", "green", "", "imgs/g.png"],
        [12, "Colours?", "green", "", "['imgs/g.png', 'imgs/g.png']"],
    ])
    big_row, path_row, two_paths = read_tsv(path)
    assert big_row.answers == ("two", "2", "Two", "a pair") and big_row.options == {}
    assert np.array_equal(np.asarray(load_images(big_row)[0]), noise)
    assert path_row.answers == ("green",) and path_row.images == ()
    assert path_row.image_paths == (os.path.join(str(tmp_path), "imgs/g.png"),)
    assert load_images(path_row)[0].size == (5, 7)
    assert len(load_images(two_paths)) == 2


def test_read_tsv_g_index_and_text_index(tmp_path):
    path = write_tsv(tmp_path / "g.tsv", ["index", "g_index", "question", "A", "B", "answer"], [
        ["q1", "q1", "Pick", "x", "y", "A"], ["q1-r1", "q1", "Pick", "y", "x", "B"]])
    rows = read_tsv(path)
    assert [(r.index, r.group) for r in rows] == [("q1", "q1"), ("q1-r1", "q1")]
    assert [(q.index, q.group, q.rotation) for q in questions(rows, circular=True)] == [("q1", "q1", 0),
                                                                                       ("q1-r1", "q1", 1)]


@pytest.mark.parametrize("header, row, message", [
    (["index", "answer"], [1, "A"], r"bad\.tsv line 1: no 'question' column"),
    (MC_HEADER, [1, "Q", "", "a", "b", "", "", "C", "", "", png_b64((1, 2, 3))],
     r"bad\.tsv line 2, column 'answer': 'C' is not among the options A, B"),
    (MC_HEADER, [1, "Q", "", "a", "b", "", "", "A", "", "", "7"],
     r"bad\.tsv line 2, column 'image': '7' refers to index 7, and no row of that index holds an image"),
    (MC_HEADER, [1, "Q", "", "a", "b", "", "", "A", "", "", "x" * 65],
     r"bad\.tsv line 2, column 'image': not a base64-encoded image"),
    (MC_HEADER, [1, "Q", "", "a", "b", "", "", "A", "", "", base64.b64encode(b"not an image at all" * 4).decode()],
     r"bad\.tsv line 2, column 'image': not a base64-encoded image \(UnidentifiedImageError"),
    (["index", "question", "answer"], [1, "Q", "[__import__('os')]"],
     r"bad\.tsv line 2, column 'answer': not a python list literal"),
    (["index", "question", "answer", "image_path"], [1, "Q", "a", "nowhere.png"],
     r"bad\.tsv line 2, column 'image_path': no such file .*nowhere\.png"),
    (["index", "question", "answer"], [1, "Q"], r"bad\.tsv line 2: 2 cells, the header has 3"),
    (["index", "question", "answer"], ["", "Q", "a"], r"bad\.tsv line 2, column 'index': empty"),
])
def test_read_tsv_errors(tmp_path, header, row, message):
    path = write_tsv(tmp_path / "bad.tsv", header, [row])
    with pytest.raises(InputError, match=message):
        read_tsv(path)


def test_read_tsv_duplicate_index(tmp_path):
    path = write_tsv(tmp_path / "dup.tsv", ["index", "question", "answer"], [[4, "Q", "a"], [4, "R", "b"]])
    with pytest.raises(InputError, match=r"dup\.tsv line 3, column 'index': index 4 is also on .*dup\.tsv line 2"):
        read_tsv(path)


def test_prompts(tmp_path):
    first, second, _ = read_tsv(mc_file(tmp_path))
    assert mc_prompt(first) == ("Look closely.\nAt the middle.\nWhat colour is it?\nA. red\nB. green\nC. blue\n"
                                "D. black\nAnswer with the option's letter from the given choices directly.")
    assert mc_prompt(second) == ("Which shape?\nA. circle\nB. square\nC. triangle\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert vqa_prompt(second) == "Which shape?\nAnswer the question using a single word or phrase."
    path = write_tsv(tmp_path / "open.tsv", ["index", "question", "answer"], [[1, "How many?", "2"]])
    with pytest.raises(InputError, match=r"open\.tsv line 2: a multiple-choice prompt needs options"):
        mc_prompt(read_tsv(path)[0])


def test_circular_rotations(tmp_path):
    rows = read_tsv(write_tsv(tmp_path / "c.tsv", ["index", "question", "A", "B", "C", "D", "answer"], [
        [7, "Q", "w", "x", "y", "z", "B"],
        [8, "Q", "cat", "dog", "Both A and B", "neither", "C"],
        [9, "Q", "A", "B", "", "", "A"],
    ]))
    rotated = circular_rotations(rows[0])
    assert [r.options for r in rotated] == [dict(A="w", B="x", C="y", D="z"), dict(A="x", B="y", C="z", D="w"),
                                           dict(A="y", B="z", C="w", D="x"), dict(A="z", B="w", C="x", D="y")]
    assert [r.answer for r in rotated] == ["B", "A", "D", "C"]
    assert all(r.options[r.answer] == "x" for r in rotated)
    assert [(r.index, r.group, r.rotation) for r in rotated] == [(7, 7, k) for k in range(4)]
    # Options naming other options' letters keep their order: VLMEvalKit's abnormal entries.
    assert [(r.options, r.rotation) for r in circular_rotations(rows[1])] == [(rows[1].options, 0)]
    assert len(circular_rotations(rows[2])) == 1


def test_questions_with_and_without_copies(tmp_path):
    plain = read_tsv(write_tsv(tmp_path / "p.tsv", ["index", "question", "A", "B", "C", "answer"], [
        [1, "Q1", "a", "b", "c", "A"], [2, "Q2", "a", "b", "", "B"]]))
    asked = questions(plain, circular=True)
    assert [(q.index, q.rotation, q.answer) for q in asked] == [(1, 0, "A"), (1, 1, "C"), (1, 2, "B"),
                                                                (2, 0, "B"), (2, 1, "A")]
    assert [(q.index, q.group, q.rotation) for q in questions(plain, circular=False)] == [(1, 1, 0), (2, 2, 0)]
    # MMBench's released layout: the copies of question 1 at 1000001 and 2000001, question 2 left single.
    copies = read_tsv(write_tsv(tmp_path / "mmb.tsv", ["index", "question", "A", "B", "C", "answer"], [
        [2000001, "Q1", "c", "a", "b", "B"], [1, "Q1", "a", "b", "c", "A"], [2, "Q2", "a", "b", "", "B"],
        [1000001, "Q1", "b", "c", "a", "C"]]))
    asked = questions(copies, circular=True)
    assert [(q.index, q.group, q.rotation) for q in asked] == [(2000001, 1, 2), (1, 1, 0), (2, 2, 0),
                                                               (1000001, 1, 1)]
    assert len(questions(copies, circular=False)) == 4
    orphan = read_tsv(write_tsv(tmp_path / "o.tsv", ["index", "question", "A", "B", "answer"], [
        [1000003, "Q", "a", "b", "A"], [2000003, "Q", "b", "a", "B"]]))
    with pytest.raises(InputError, match=r"o\.tsv line 2: index 1000003 is a circular copy of index 3, which no row"):
        questions(orphan, circular=True)


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"),
    ("(C)", "C"),
    ("The answer is C.", "C"),
    ("B. blue", "B"),
    ("I think it is D", "D"),
    ("A is said first here, then a long explanation follows it", None),  # a letter too early, no option text
    ("A or B", None),  # two letters, and the option texts are not in it
    ("red", "A"),  # one option text inside the reply
    ("It is red or green", None),  # two option texts
    ("The correct answer is **C**, since the ball looks blue in this light", "C"),
    ("the answer is a dog", "A"),  # VLMEvalKit's case-blind "answer is X"
    ("Z", None),
    ("Cannot determine the answer: B", None),
    ("It is blue" + " really" * 20, None),  # more than twice the option texts' length: no text match
])
def test_extract_option(prediction, letter):
    assert extract_option(prediction, dict(A="red", B="green", C="blue", D="black")) == letter


@pytest.mark.parametrize("text, normal", [
    ("Two", "2"), ("the cat.", "cat"), ("dont", "don't"), ("couldnt've", "couldn't've"), ("Yes!", "yes"),
    ("1,000", "1000"), ("2.", "2"), ("3.5", "3.5"), ("a   red\tcar\n", "red car"), ("left-hand", "left hand"),
    ("black - white", "black white"), ("None", "0"),
])
def test_normalize_vqa_answer(text, normal):
    assert normalize_vqa_answer(text) == normal


def test_vqa_accuracy():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("the cat.", ["cat"] * 4 + ["dog"] * 6) == 1.0
    # 3 of 10: each of the 3 subsets leaving a match out has 2 matches (2/3), the other 7 have 3 (1).
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("dont", ["don't"] + ["do not"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0
    with pytest.raises(ValueError, match="several reference answers"):
        vqa_accuracy("cat", ["cat"])


def test_exact_match():
    assert exact_match("The Cat.", ["cat"]) == 1.0
    assert exact_match("three", ["3", "4"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0


def test_score_mc_circular(tmp_path):
    rows = read_tsv(mc_file(tmp_path))
    asked = questions(rows, circular=True)
    assert len(asked) == 4 + 3 + 2
    truth = [q.options[q.answer] for q in asked]
    # Question 1 right every time; question 2 wrong on its last rotation; question 3 right by text.
    predictions = [q.answer for q in asked[:4]] + ["C", "B", "The answer is B"] + [truth[7], truth[8]]
    done = records(asked, predictions, "mc")
    assert [r["hit"] for r in done] == [True] * 4 + [True, True, False] + [True, True]
    assert done[4] == dict(index=2, group=2, rotation=0, category="shape", l2_category="perception",
                           question="Which shape?", options=dict(A="circle", B="square", C="triangle"), answer="C",
                           prediction="C", extracted="C", hit=True)
    result = score(asked, predictions, "mc")
    assert result == dict(metric="mc", accuracy=pytest.approx(8 / 9), count=9,
                          circular_accuracy=pytest.approx(2 / 3), questions=3,
                          accuracy_by_category=dict(colour=1.0, shape=0.0), count_by_category=dict(colour=2, shape=1),
                          accuracy_by_l2_category=dict(perception=0.5, reasoning=1.0),
                          count_by_l2_category=dict(perception=2, reasoning=1))
    once = questions(rows, circular=False)
    plain = score(once, ["A", "C", "B"], "mc")
    assert plain["accuracy"] == plain["circular_accuracy"] == pytest.approx(2 / 3) and plain["questions"] == 3


def test_score_vqa_and_exact(tmp_path):
    path = write_tsv(tmp_path / "v.tsv", ["index", "question", "answer", "category"], [
        [1, "How many?", str(["2"] * 2 + ["3"] * 8), "count"],
        [2, "What?", str(["cat"] * 10), "object"],
        [3, "Where?", str(["park"] * 3 + ["lawn"] * 7), "object"],
    ])
    asked = questions(read_tsv(path), circular=False)
    result = score(asked, ["two", "A cat.", "park"], "vqa")
    assert result == dict(metric="vqa", accuracy=pytest.approx((0.6 + 1 + 0.9) / 3), count=3,
                          accuracy_by_category=dict(count=pytest.approx(0.6), object=pytest.approx(0.95)),
                          count_by_category=dict(count=1, object=2))
    assert records(asked, ["two", "A cat.", "park"], "vqa")[0]["answers"] == ["2", "2"] + ["3"] * 8
    assert score(asked, ["two", "dog", "lawn"], "exact")["accuracy"] == pytest.approx(2 / 3)


def test_score_errors(tmp_path):
    single = questions(read_tsv(write_tsv(tmp_path / "s.tsv", ["index", "question", "answer"], [[1, "Q", "a"]])),
                       circular=False)
    with pytest.raises(InputError, match=r"s\.tsv line 2: metric vqa needs several answers"):
        score(single, ["a"], "vqa")
    with pytest.raises(InputError, match=r"s\.tsv line 2: metric mc needs options"):
        score(single, ["a"], "mc")
    with pytest.raises(InputError, match="unknown benchmark metric 'bleu'"):
        score(single, ["a"], "bleu")
    hidden = read_tsv(write_tsv(tmp_path / "h.tsv", ["index", "question", "A", "B"], [[1, "Q", "a", "b"]]))
    with pytest.raises(InputError, match=r"h\.tsv line 2: no answer to score against"):
        score(hidden, ["A"], "mc")
    with pytest.raises(InputError, match="no questions to score"):
        score([], [], "exact")


def test_load_images_corrupt_pixels(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    truncated = base64.b64encode(buf.getvalue()[:200]).decode()  # the header intact, the pixels cut short
    row, = read_tsv(write_tsv(tmp_path / "t.tsv", ["index", "question", "answer", "image"], [[1, "Q", "a", truncated]]))
    with pytest.raises(InputError, match=r"t\.tsv line 2, column 'image': cannot decode the image"):
        load_images(row)


def test_read_tsv_byte_order_mark(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_text("index\tquestion\tanswer\n1\tQ\ta\n", encoding="utf-8-sig")
    assert [(r.index, r.answers) for r in read_tsv(str(path))] == [(1, ("a",))]


def test_read_tsv_unreadable(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"benchmark file not found: .*missing\.tsv"):
        read_tsv(str(tmp_path / "missing.tsv"))
    path = tmp_path / "latin.tsv"
    path.write_bytes("index\tquestion\n1\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.tsv: not UTF-8 text \(.*position 20"):
        read_tsv(str(path))
    long = tmp_path / "long.tsv"
    long.write_text("index\tquestion\n1\tQ\n2\t" + "Q" * 100 + "\n")
    monkeypatch.setattr(tsv, "_FIELD_LIMIT", 50)
    limit = csv.field_size_limit()
    try:
        with pytest.raises(InputError, match=r"long\.tsv line 3: not a readable TSV line \(field larger than field"):
            read_tsv(str(long))
    finally:
        csv.field_size_limit(limit)  # the csv module's limit is the whole process's
