import numpy as np
import pytest

from vlm_jax.data.synthetic import COLORS, QTYPES, QUADRANTS, SHAPES, SyntheticSource, caption

N = 150


def source(split="train", seed=0, lo=48, hi=160):
    return SyntheticSource(split, 10_000, seed, lo, hi)


def test_deterministic_by_seed_split_index():
    a, b = source(), source()
    for i in (0, 1, 17, 9999):
        ra, rb = a[i], b[i]
        assert ra["id"] == rb["id"] == f"synthetic-train-{i}"
        assert ra["conversations"] == rb["conversations"] and ra["qtype"] == rb["qtype"]
        np.testing.assert_array_equal(np.asarray(ra["images"][0]), np.asarray(rb["images"][0]))
    # Order of access does not matter (random access for shuffling).
    np.testing.assert_array_equal(np.asarray(source()[5]["images"][0]), np.asarray(a[5]["images"][0]))
    assert source(seed=1).scene(0) != a.scene(0)
    with pytest.raises(IndexError, match="10000"):
        a[10_000]


def test_train_and_eval_disjoint():
    train = {source("train").scene(i) for i in range(400)}
    evals = {source("eval").scene(i) for i in range(400)}
    assert len(train) == 400 and not train & evals
    with pytest.raises(ValueError, match="split"):
        SyntheticSource("test", 10, 0, 48, 160)


def test_record_shape_and_variety():
    src = source()
    sizes, qtypes, counts = set(), set(), set()
    for i in range(N):
        r = src[i]
        img = r["images"][0]
        assert img.mode == "RGB" and 48 <= img.width <= 160 and 48 <= img.height <= 160
        assert max(img.size) / min(img.size) <= 2.0 + 1e-6
        turns = r["conversations"]
        assert [role for role, _ in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0][1].startswith("<image>\n") and all(t for _, t in turns)
        assert sum("<image>" in t for _, t in turns) == 1
        sizes.add(img.size)
        qtypes.update(qtype for qtype, _, _ in src.scene(i).qa)
        counts.add(len(src.scene(i).shapes))
    assert qtypes == set(QTYPES) and counts == {1, 2, 3, 4} and len(sizes) > N // 2


def test_answers_match_the_pixels():
    src = source()
    palette = np.array(list(COLORS.values()), np.float32)
    for i in range(N):
        s, r = src.scene(i), src[i]
        img = np.asarray(r["images"][0]).astype(np.float32)
        qw, qh = s.width / 2, s.height / 2
        for shape in s.shapes:
            # Every shape lies entirely inside the quadrant it is reported in.
            q = QUADRANTS.index(shape.quadrant)
            x0, y0 = (q % 2) * qw, (q // 2) * qh
            assert x0 <= shape.cx - shape.r and shape.cx + shape.r <= x0 + qw
            assert y0 <= shape.cy - shape.r and shape.cy + shape.r <= y0 + qh
            # Its centre pixel has its colour, and that colour stands out from the background.
            centre = img[int(shape.cy), int(shape.cx)]
            np.testing.assert_array_equal(centre, COLORS[shape.color])
            assert np.linalg.norm(centre - np.array(s.background)) >= 120
        # Quadrants without a shape hold no pixel of any colour that may be drawn on this background.
        drawable = palette[np.linalg.norm(palette - np.array(s.background), axis=-1) >= 120]
        used = {QUADRANTS.index(x.quadrant) for x in s.shapes}
        for q in set(range(4)) - used:
            x0, y0 = int((q % 2) * qw), int((q // 2) * qh)
            block = img[y0:int(y0 + qh), x0:int(x0 + qw)].reshape(-1, 1, 3)
            assert (np.linalg.norm(block - drawable[None], axis=-1).min() > 30).all()

        turns = r["conversations"]
        for (qtype, q, a), (_, question), (_, answer) in zip(s.qa, turns[0::2], turns[1::2]):
            assert question.endswith(q) and answer == a
            check_answer(s, qtype, question, answer, qh, qw)


def test_train_turns_never_give_away_another_answer():
    """Captions stand alone, a count comes first, and each shape is the subject of one question."""
    train, evals = source("train"), source("eval")
    turns = [len(train.scene(i).qa) for i in range(N)]
    assert min(turns) == 1 and max(turns) >= 4
    for i in range(N):
        s = train.scene(i)
        qtypes = [qtype for qtype, _, _ in s.qa]
        if "caption" in qtypes:
            assert qtypes == ["caption"]
        assert "count" not in qtypes[1:] and qtypes.count("count") <= 1
        subjects = [subject(s, qtype, q) for qtype, q, _ in s.qa if qtype not in ("count", "caption")]
        assert len(set(subjects)) == len(subjects)
        assert len(evals.scene(i).qa) == 1 and evals.scene(i).qtype != "caption"


def subject(s, qtype, question):
    """The one shape a colour, shape or position question is about."""
    if qtype == "color":
        (x,) = [x for x in s.shapes if f" {x.shape}?" in question]
    elif qtype == "shape":
        (x,) = [x for x in s.shapes if f" {x.color} " in question]
    else:
        (x,) = [x for x in s.shapes if f" {x.color} {x.shape}" in question]
    return x


def check_answer(s, qtype, question, answer, qh, qw):
    by_shape = [x for x in s.shapes if x.shape in question]
    by_color = [x for x in s.shapes if f" {x.color} " in question]
    if qtype == "count":
        assert answer == str(len(s.shapes))
    elif qtype == "color":
        assert len(by_shape) == 1 and answer == by_shape[0].color
    elif qtype == "shape":
        assert len(by_color) == 1 and answer == by_color[0].shape and answer in SHAPES
    elif qtype == "position":
        (target,) = [x for x in s.shapes if f"{x.color} {x.shape}" in question]
        vertical = "top" if target.cy < qh else "bottom"
        horizontal = "left" if target.cx < qw else "right"
        if question.endswith("on the left or the right?"):
            assert answer == horizontal
        elif question.endswith("at the top or the bottom?"):
            assert answer == vertical
        else:
            assert question.endswith(f"Where is the {target.color} {target.shape}?")
            assert answer == f"{vertical} {horizontal}"
    else:
        assert answer == caption(s.shapes) and answer.count(";") == len(s.shapes) - 1
        for x in s.shapes:
            assert f"in the {x.quadrant}, {'an' if x.color[0] in 'aeiou' else 'a'} {x.color} {x.shape}" in answer


def test_position_turns_ask_one_axis_in_training_only():
    train = [q for i in range(300) for t, q, _ in source("train").scene(i).qa if t == "position"]
    one_axis = [q for q in train if not q.startswith("Where is")]
    assert {q.rsplit(" the ", 2)[-2] for q in one_axis} == {"left or", "top or"}
    assert 0.2 < len(one_axis) / len(train) < 0.45
    evals = [q for i in range(300) for t, q, _ in source("eval").scene(i).qa if t == "position"]
    assert evals and all(q.startswith("Where is") for q in evals)


def test_demo_sizes_and_no_matching_background():
    src = source(lo=32, hi=96)
    for i in range(N):
        s = src.scene(i)
        assert 32 <= s.width <= 96 and 32 <= s.height <= 96
        assert len({(x.color, x.shape) for x in s.shapes}) == len(s.shapes)
        for x in s.shapes:
            assert np.linalg.norm(np.subtract(COLORS[x.color], s.background)) >= 120


def test_excluded_question_types_leave_training_but_not_evaluation():
    held = SyntheticSource("train", 10_000, 0, 48, 160, exclude=("position",))
    asked = [t for i in range(300) for t, _, _ in held.scene(i).qa]
    assert "position" not in asked and {"color", "shape", "count", "caption"} <= set(asked)
    evals = SyntheticSource("eval", 10_000, 0, 48, 160, exclude=("position",))
    assert "position" in {evals.scene(i).qtype for i in range(100)}
    with pytest.raises(ValueError, match="exclude_qtypes"):
        SyntheticSource("train", 10, 0, 48, 160, exclude=("colour",))
    with pytest.raises(ValueError, match="keep 'position' or 'count'"):
        SyntheticSource("train", 10, 0, 48, 160, exclude=("position", "count"))
    no_position = SyntheticSource("train", 10_000, 0, 48, 160, exclude=("position", "caption"))
    assert all(no_position.scene(i).qa and {t for t, _, _ in no_position.scene(i).qa} <= {"color", "shape", "count"}
               for i in range(300))
