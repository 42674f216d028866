import ast
import glob
import json
import logging
import os
import pickle

import numpy as np
import pytest

from configs import base
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.data.pipeline import make_eval_examples, make_example_dataset, make_source, make_train_iterator
from vlm_jax.data.image_kinds import RecordToExample
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from tests.helpers import first_batch

TOK = load_tokenizer("")
IMAGE_ID = special_ids(TOK).image


def small_config(**data):
    c = base.get_config()
    c.batch_size = 4
    c.model.vision.patch_size = 8
    d = c.data
    d.update(template="vicuna_v1", seq_len=160, tile_size=32, max_tiles=4, max_tiles_per_row=10,
             min_image_size=32, max_image_size=96, num_train=1000, num_eval=20, threads=2)
    d.update(**data)
    return c


def batches(it, n):
    return [next(it) for _ in range(n)]


def segments(batch, row):
    """[(start, end)] of each packed example in a row."""
    seg = batch["segment_ids"][row]
    return [(int(np.argmax(seg == s)), int(np.argmax(seg == s)) + int((seg == s).sum()))
            for s in range(1, seg.max() + 1)]


def test_batch_contract_shapes():
    c = small_config()
    it = make_train_iterator(c, TOK)
    b = next(it)
    B, L, T, S, P = 4, 160, 10, 32, tokens_per_tile(c.model, c.data.tile_size)
    assert P == 16
    want = dict(tokens=((B, L), np.int32), targets=((B, L), np.int32), loss_mask=((B, L), np.float32),
                positions=((B, L), np.int32), segment_ids=((B, L), np.int32), source_ids=((B, L), np.int32),
                tiles=((B, T, S, S, 3), np.float32), tile_mask=((B, T), np.bool_), image_dest=((B, T * P), np.int32))
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    it.close()


def test_rows_follow_the_example_stream_exactly():
    """Rows hold consecutive stream examples, greedily; segments/positions/targets/tiles are consistent."""
    c = small_config()
    ds = make_example_dataset(c, TOK)
    it = make_train_iterator(c, TOK)
    L, T, P = 160, 10, 16
    index = 0
    for b in batches(it, 4):
        for row in range(4):
            segs = segments(b, row)
            assert segs and segs[0][0] == 0
            assert all(e == s2 for (_, e), (s2, _) in zip(segs, segs[1:]))  # contiguous, then padding
            end = segs[-1][1]
            assert (b["tokens"][row, end:] == 0).all() and (b["segment_ids"][row, end:] == 0).all()
            assert (b["loss_mask"][row, end:] == 0).all()
            slot = 0
            for (s, e) in segs:
                ex = ds[index]
                index += 1
                n, k = e - s, len(ex.tiles)
                np.testing.assert_array_equal(b["tokens"][row, s:e], ex.tokens)
                np.testing.assert_array_equal(b["positions"][row, s:e], np.arange(n))
                np.testing.assert_array_equal(b["targets"][row, s:e - 1], ex.tokens[1:])
                assert b["targets"][row, e - 1] == 0 and b["loss_mask"][row, e - 1] == 0
                # Masked targets decode to the answer + eos of this example.
                masked = b["targets"][row, s:e][b["loss_mask"][row, s:e] > 0]
                assert TOK.decode(masked.tolist()).endswith("</s>") and masked.size >= 2
                np.testing.assert_array_equal(b["tiles"][row, slot:slot + k], ex.tiles)
                dest = b["image_dest"][row, slot * P:(slot + k) * P]
                assert (dest >= s).all() and (dest < e).all()
                slot += k
            # Greedy: the first example of the next row did not fit here.
            nxt = ds[index]
            assert end + len(nxt) > L or slot + len(nxt.tiles) > T
            assert b["tile_mask"][row].sum() == slot and b["tile_mask"][row, :slot].all()
            assert (b["tiles"][row, slot:] == 0).all()
            # image_dest covers every placeholder exactly once and nothing else; padded slots point at L.
            dest = b["image_dest"][row, :slot * P]
            assert sorted(dest.tolist()) == np.flatnonzero(b["tokens"][row] == IMAGE_ID).tolist()
            assert (b["image_dest"][row, slot * P:] == L).all()
            assert not b["loss_mask"][row][np.isin(np.arange(L), dest)].any()
    assert it.get_state()["states"]["0"]["next_index"] == index
    it.close()


def test_loss_targets_decode_to_answers():
    c = small_config(num_train=50)
    src = make_source(c, "train")
    answers = {a for i in range(50) for role, a in src[i]["conversations"] if role == "gpt"}
    b = first_batch(c)
    for row in range(4):
        for s, e in segments(b, row):
            masked = b["targets"][row, s:e][b["loss_mask"][row, s:e] > 0]
            text = TOK.decode(masked.tolist())
            assert text.startswith(" ") and text.endswith("</s>")
            assert all(part[1:] in answers for part in text.split("</s>")[:-1])


def test_state_restore_gives_identical_batches():
    c = small_config()
    it = make_train_iterator(c, TOK)
    batches(it, 3)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    after = batches(it, 3)
    fresh = make_train_iterator(c, TOK)
    fresh.set_state(state)
    for x, y in zip(after, batches(fresh, 3)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Rewinding the same iterator mid-prefetch works too.
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["tokens"], after[0]["tokens"])
    with pytest.raises(ValueError, match="data.shards=1, this run has data.shards=2"):
        make_train_iterator(small_config(shards=2), TOK).set_state(state)
    it.close()
    fresh.close()


def test_process_shards_are_disjoint_and_epochs_reshuffle():
    c = small_config(num_train=40)
    c.batch_size = 4
    shards = [make_example_dataset(c, TOK, p, 2) for p in range(2)]
    ids = [[shards[p][i].id for i in range(20)] for p in range(2)]
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 40
    # Reading past the end continues into a reshuffled next epoch, again partitioned between processes.
    epoch2 = [[shards[p][i].id for i in range(20, 40)] for p in range(2)]
    assert not set(epoch2[0]) & set(epoch2[1]) and len(set(epoch2[0]) | set(epoch2[1])) == 40
    assert epoch2[0] != ids[0]
    with pytest.raises(ValueError, match="data.shards=3 must divide batch_size 4"):
        make_train_iterator(small_config(num_train=40, shards=3), TOK)


def test_over_long_example_is_an_error_naming_it():
    c = small_config(seq_len=60)
    with pytest.raises(ValueError, match=r"example synthetic-train-\d+: \d+ tokens exceed data.seq_len 60"):
        batches(make_train_iterator(c, TOK), 3)
    c = small_config(max_tiles_per_row=3)
    with pytest.raises(ValueError, match=r"example synthetic-train-\d+: 5 tiles exceed data.max_tiles_per_row 3"):
        batches(make_train_iterator(c, TOK), 3)


def test_over_long_can_be_skipped(caplog):
    c = small_config(seq_len=60, skip_too_long=True)
    with caplog.at_level(logging.WARNING):
        b = first_batch(c)
    assert "skipping example synthetic-train-" in caplog.text
    assert (b["segment_ids"].max(axis=1) >= 1).all()


def test_example_transform_pickles():
    # grain worker processes receive the transform by pickling.
    c = small_config()
    f = pickle.loads(pickle.dumps(RecordToExample(c, TOK)))
    rec = make_source(c, "train")[3]
    np.testing.assert_array_equal(f(rec).tokens, RecordToExample(c, TOK)(rec).tokens)


def test_eval_examples():
    c = small_config()
    src = make_source(c, "eval")
    evals = make_eval_examples(c, TOK, 5)
    assert len(evals) == 5
    for i, ex in enumerate(evals):
        rec = src[i]
        assert ex["id"] == rec["id"] and ex["qtype"] == rec["qtype"]
        assert ex["answer"] == rec["conversations"][1][1]
        assert ex["tokens"].dtype == np.int32 and ex["tokens"][0] == TOK.bos_token_id
        assert TOK.decode(ex["tokens"].tolist()).endswith("ASSISTANT:")
        k = len(ex["tiles"])
        assert ex["tiles"].shape == (k, 32, 32, 3) and k >= 1
        assert ex["image_positions"].shape == (k * 16,)
        assert np.flatnonzero(ex["tokens"] == IMAGE_ID).tolist() == ex["image_positions"].tolist()
        assert len(ex["raw_images"]) == len(rec["images"]) == 1 and ex["image"] is ex["raw_images"][0]
        np.testing.assert_array_equal(np.asarray(ex["image"]), np.asarray(rec["images"][0]))
    with pytest.raises(ValueError, match="eval source has 20"):
        make_eval_examples(c, TOK, 21)


def test_data_code_imports_no_model_or_trainer_code():
    root = os.path.join(os.path.dirname(__file__), "..", "vlm_jax", "data")
    for path in glob.glob(os.path.join(root, "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                assert top not in ("jax", "flax", "optax", "torch"), (path, name)
                # vlm_jax.errors and vlm_jax.files import nothing of vlm_jax: every module's error kinds and file writes.
                assert top != "vlm_jax" or name.startswith(("vlm_jax.data", "vlm_jax.errors", "vlm_jax.files")), \
                    (path, name)
