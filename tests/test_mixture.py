"""Weighted mixtures of training sources (data.mixture): the mixed stream, its accounting and per-source losses."""

import json
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from vlm_jax.cli import check_data
from vlm_jax.config import check_values, load_config, set_key, to_json, upgrade_config
from vlm_jax.data.mixture import WeightedSchedule, mixture_names
from vlm_jax.data.pipeline import example_counts, make_example_dataset, make_train_iterator, merge_shard_states
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from vlm_jax.errors import InputError
from vlm_jax.layers.loss import masked_sum
from vlm_jax.model import forward_nll
from vlm_jax.train import loop
from vlm_jax.train.step import make_train_step
from tests.helpers import ITEMS, ROOT, TINY, first_batch, tiny_config, write_dataset

TOK = load_tokenizer("")
IMAGE_ID = special_ids(TOK).image
# Two synthetic sources that differ in size and image sizes.
TWO = ("data.mixture=[({'name': 'big', 'num_train': 300}, 3), "
       "({'name': 'small', 'num_train': 100, 'max_image_size': 48}, 1.0)]")


def small_config(*extra: str):
    """A tiled config small enough to pack without a model; `key=value` overrides of data keys on top."""
    c = base.get_config()
    c.batch_size = 4
    c.total_steps = 10
    c.model.vision.patch_size = 8
    c.data.update(seq_len=160, tile_size=32, max_tiles=4, max_tiles_per_row=10, min_image_size=32,
                  max_image_size=96, threads=2)
    for item in extra:
        key, _, value = item.partition("=")
        set_key(c, key, value)
    return c


def segment_sources(batches: list[dict]) -> list[int]:
    """The source of every packed example of `batches`, read at each segment's first token."""
    out = []
    for b in batches:
        seg = b["segment_ids"]
        starts = (seg > 0) & (np.diff(seg, prepend=0, axis=1) != 0)
        out += b["source_ids"][starts].tolist()
    return out


@pytest.mark.parametrize("weights", [(3, 1), (0.7, 0.2, 0.1), (1, 2, 3, 4), (5, 1, 1, 1, 1, 2)])
def test_every_prefix_holds_each_source_at_its_weight(weights):
    schedule = WeightedSchedule(list(weights), [1000] * len(weights))
    share = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    levels = (len(weights) - 1).bit_length()  # depth of the schedule's tree over the sources
    counts = [0] * len(weights)
    for n in range(3000):
        k, j = schedule[n]
        assert j == counts[k]  # each source's stream is read in order, every item once
        counts[k] += 1
        worst = max(abs(c - (n + 1) * s) for c, s in zip(counts, share))
        assert worst <= Fraction(levels, 2), (n, counts)  # half an item per level
        if len(weights) <= 4:
            assert worst < 1, (n, counts)
    # Random access: item n's source is a function of n alone.
    assert [schedule[n] for n in (2999, 5, 1234)] == [WeightedSchedule(list(weights), [1000] * len(weights))[n]
                                                     for n in (2999, 5, 1234)]


def test_the_mixed_stream_is_a_function_of_the_seed():
    def first(config, n=24):
        ds = make_example_dataset(config, TOK)
        return [(ds[i].id, ds[i].source) for i in range(n)]

    c = small_config(TWO)
    a = first(c)
    assert a == first(small_config(TWO))
    assert [s for _, s in a].count(0) == 18  # 3:1 over every prefix of 4
    assert first(small_config(TWO, "seed=1")) != a
    # Its examples past the first source's length come from its next, reshuffled epoch.
    ds = make_example_dataset(c, TOK)
    big = [ds[i].id for i in range(600) if ds[i].source == 0]
    assert len(big) == 450 and sorted(big[:300]) == sorted(f"synthetic-train-{i}" for i in range(300))
    assert big[300:] != big[:150]
    # The two sources have shuffles of their own: seeded by the run's seed and their names.
    small = [ds[i].id for i in range(40) if ds[i].source == 1]
    assert [int(x.rsplit("-", 1)[1]) for x in small] != [int(x.rsplit("-", 1)[1]) for x in big[:len(small)]]


def test_shards_and_their_division_between_processes_give_the_same_batch():
    c = small_config(TWO, "data.shards=2")
    whole = make_train_iterator(c, TOK)
    parts = [make_train_iterator(c, TOK, [s]) for s in (0, 1)]
    try:
        for _ in range(3):
            b, p0, p1 = next(whole), next(parts[0]), next(parts[1])
            for k in b:
                np.testing.assert_array_equal(b[k], np.concatenate([p0[k], p1[k]]), err_msg=k)
        state = merge_shard_states([p.get_state() for p in parts])
        assert state == whole.get_state()
        counts = example_counts(state, ("big", "small"))
        assert sum(counts.values()) == sum(sum(s["examples"]) for s in state["states"].values()) > 0
    finally:
        for it in [whole, *parts]:
            it.close()


@pytest.mark.parametrize("window", [0, 8])
def test_resume_mid_mixture_continues_exactly_and_counts_each_source(window):
    c = small_config(TWO, f"data.pack_window={window}", "data.shards=2")
    it = make_train_iterator(c, TOK)
    try:
        seen = [next(it) for _ in range(3)]
        state = it.get_state()
        after = [next(it) for _ in range(3)]
    finally:
        it.close()
    sources = segment_sources(seen)
    assert example_counts(state, ("big", "small")) == {"examples/big": sources.count(0),
                                                        "examples/small": sources.count(1)}
    assert sources.count(1) > 0
    resumed = make_train_iterator(c, TOK)
    try:
        resumed.set_state(json.loads(json.dumps(state)))
        for want in after:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert example_counts(resumed.get_state(), ("big", "small"))["examples/small"] == segment_sources(
            seen + after).count(1)
    finally:
        resumed.close()


def test_a_single_source_batch_has_source_ids_zero_and_counts_its_examples():
    it = make_train_iterator(small_config("data.num_train=200"), TOK)
    try:
        b = next(it)
        (state,) = it.get_state()["states"].values()
    finally:
        it.close()
    assert not b["source_ids"].any()
    assert state["examples"] == [len(segment_sources([b]))]


def test_text_only_records_pack_with_image_records(tmp_path):
    images = write_dataset(tmp_path, ITEMS[:2], "images.json")
    text = [{"id": f"txt-{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                  {"from": "gpt", "value": "ok"}]} for i in range(6)]
    (tmp_path / "text.json").write_text(json.dumps(text))
    c = small_config(f"data.mixture=[({{'source': 'llava_json', 'path': '{images}'}}, 1), "
                     f"({{'source': 'llava_json', 'path': '{tmp_path / 'text.json'}'}}, 1)]",
                     "batch_size=2", "data.seq_len=400")
    assert mixture_names(c) == ("images", "text")
    b = first_batch(c, TOK)
    seg, src = b["segment_ids"], b["source_ids"]
    mixed = [r for r in range(2) if {0, 1} <= set(src[r][seg[r] > 0].tolist())]
    assert mixed, src
    for r in mixed:
        for s in range(1, seg[r].max() + 1):
            tokens = b["tokens"][r][seg[r] == s]
            # Image records hold their placeholders, text-only ones none.
            assert (tokens == IMAGE_ID).any() == (src[r][seg[r] == s][0] == 0)


SMALL_MODEL = ("data.pack_window=0", "model.text.layers=1", "model.vision.depth=1")


def hand_losses(setup: loop.Setup, params, batch: dict) -> tuple[float, dict[str, float]]:
    """The loss of `params` on `batch`, and each source's (the mean over its loss-mask tokens)."""
    nll = np.asarray(jax.jit(lambda p: forward_nll(setup.model, {"params": p}, batch))(params))
    mask, per_source = batch["loss_mask"], {}
    for k, name in enumerate(mixture_names(setup.config)):
        total, count = masked_sum(nll, np.where(batch["source_ids"] == k, mask, 0.0))
        assert count > 0
        per_source[name] = total / count
    total, count = masked_sum(nll, mask)
    return total / count, per_source


def test_loss_per_source_in_one_pass_and_without_sources():
    config = tiny_config(TWO, *SMALL_MODEL)
    setup = loop.Setup(config, jax.devices()[:1])
    batch, state = first_batch(config, TOK), setup.fresh_state()
    loss, per_source = hand_losses(setup, state.params, batch)

    def step(sources: tuple[str, ...]) -> dict:
        run = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, sources=sources)
        return jax.device_get(run(jax.tree.map(jnp.copy, state), batch)[1])  # the step donates its state

    metrics = step(mixture_names(config))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    for name, want in per_source.items():
        np.testing.assert_allclose(metrics[f"loss/{name}"], want, rtol=1e-5)
    # Without sources (one training source) the step's metrics are what they were, the per-source ones aside.
    single = step(())
    assert sorted(single) == ["grad_norm", "loss", "loss_tokens", "skipped"]
    assert all(single[k] == metrics[k] for k in single)


def test_a_two_source_run_logs_examples_and_loss_per_source(tmp_path):
    # Micro-batches: the accumulated path of the per-source losses, on the 8 devices' mesh.
    config = tiny_config(TWO, *SMALL_MODEL, "total_steps=2", "batch_size=16", "micro_batches=2")
    loop.train(config, str(tmp_path / "run"))
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    it = make_train_iterator(config, TOK)
    try:
        batches = [next(it) for _ in range(2)]
    finally:
        it.close()
    assert [(m["step"], m["examples/big"], m["examples/small"]) for m in lines] == [
        (n, segment_sources(batches[:n]).count(0), segment_sources(batches[:n]).count(1)) for n in (1, 2)]
    setup = loop.Setup(config, jax.devices()[:1])
    # Step 1 ran the initial parameters (the same on any mesh) on batch 0.
    loss, per_source = hand_losses(setup, setup.fresh_state().params, batches[0])
    np.testing.assert_allclose(lines[0]["loss"], loss, rtol=1e-5)
    for name, want in per_source.items():
        np.testing.assert_allclose(lines[0][f"loss/{name}"], want, rtol=1e-5)
    assert np.isfinite([lines[1]["loss/big"], lines[1]["loss/small"]]).all()


@pytest.mark.parametrize("entry, match", [
    ("[({'pth': 'x.json'}, 1)]", r"data.mixture entry 0 \('synthetic'\): unknown key\(s\) 'pth'; a source sets name"),
    ("[({'name': 'a'}, 0)]", r"data.mixture entry 0 \('a'\): weight 0 must be a positive number"),
    ("[({'name': 'a'}, 1), ({'name': 'b'}, -2.5)]", r"entry 1 \('b'\): weight -2.5 must be"),
    ("[({'num_train': 10}, 1), ({'num_train': 20}, 1)]",
     r"data.mixture entry 1 \('synthetic'\): entry 0 is named 'synthetic' too: give one of them another 'name'"),
    ("[({'name': 'a'}, 1, 2)]", r"data.mixture entry 0 is \({'name': 'a'}, 1, 2\), not \(source_config dict, "),
    ("[({'name': 'a b'}, 1)]", r"entry 0 \('a b'\): name 'a b' must be letters"),
    ("[({'name': 'a', 'num_train': 0}, 1), ({'name': 'b'}, 1)]",
     r"data.mixture source 'a': config key data.num_train=0 must be at least 1"),
    ("[({'name': 'a', 'source': 'tfds'}, 1)]", r"data.mixture source 'a': config key data.source='tfds' is not one"),
    ("[({'name': 'a', 'num_train': 'many'}, 1)]", r"entry 0 \('a'\): num_train='many': "),
])
def test_a_bad_mixture_is_one_error_naming_its_entry(entry, match):
    config = small_config(f"data.mixture={entry}")
    with pytest.raises(InputError, match=match):
        check_values(config)


def test_epochs_are_refused_with_a_mixture():
    with pytest.raises(InputError, match=r"data.epochs=1 counts passes over one source, but data.mixture draws"):
        check_values(small_config(TWO, "data.epochs=1", "total_steps=0"))


def test_a_mixture_is_set_from_the_command_line_and_saved_as_json():
    config = load_config(os.path.join(ROOT, "configs/demo.py"), TINY + [TWO])
    check_values(config)
    assert mixture_names(config) == ("big", "small")
    again = upgrade_config(json.loads(to_json(config)))  # a workdir's config.json, as resume reads it
    assert mixture_names(again) == ("big", "small")
    assert [s[1] for s in again.data.mixture] == [3, 1.0]


def test_check_data_checks_and_names_every_source(tmp_path, capsys):
    good = write_dataset(tmp_path, ITEMS, "good.json")
    bad = ITEMS[:1] + [{"id": "gone", "image": "imgs/missing.png", "conversations": ITEMS[0]["conversations"]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    argv = ["--config", os.path.join(ROOT, "configs/demo.py"), *(f"--config.{o}" for o in TINY),
            f"--config.data.mixture=[({{'source': 'llava_json', 'path': '{good}'}}, 2), "
            f"({{'source': 'llava_json', 'path': '{tmp_path / 'bad.json'}', 'name': 'other'}}, 1)]"]
    with pytest.raises(SystemExit) as done:
        check_data.main(argv)
    assert done.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"bad (train/other): {tmp_path / 'bad.json'}: example 1 (id gone)")
    summary = json.loads(lines[-1])
    assert summary["train/good"] == dict(records=3, bad=0, too_long=0, without_image=1)
    assert summary["train/other"] == dict(records=2, bad=1, too_long=0, without_image=0)
    assert "train" not in summary and "eval" in summary  # the synthetic eval source of the demo config
