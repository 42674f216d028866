"""Packing is exact: the loss and gradients of a packed batch equal those of the same examples run one per
row, for the tiled and the NaViT batch (1-D and M-RoPE decoder); the NaViT iterator keeps the batch contract and
resumes exactly; with an M-RoPE decoder its rows hold each example's own ids and train."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ROOT, TINY, first_batch, tiny_config
from vlm_jax.config import load_config
from vlm_jax.data.navit import example_mrope_positions
from vlm_jax.data.packing import check_fits
from vlm_jax.data.pipeline import make_example_dataset, make_train_iterator, row_layout
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from vlm_jax.image_inputs import dummy_inputs
from vlm_jax.model import VLM, forward_nll
from vlm_jax.train.loop import train
from vlm_jax.layers.loss import masked_mean

TOK = load_tokenizer("")


def navit_config(*extra: str):
    return load_config(f"{ROOT}/configs/demo_navit.py", TINY + list(extra))


def navit_mrope_config(*extra: str):
    """navit_config with Qwen2-VL's M-RoPE decoder (head_dim 32: 16 frequencies in sections of 4, 6, 6)."""
    config = navit_config(*extra)
    config.model.text.update(dict(rope_kind="mrope", mrope_sections=[4, 6, 6]))
    return config


def pack(layout, examples, rows: int) -> tuple[dict, list]:
    """Greedily packs `examples` in order into `rows` rows; returns the batch and the examples it holds."""
    batch, groups, used = layout.empty(rows), [[]], [0] * len(layout.budgets)
    for ex in examples:
        assert check_fits(ex, layout) is None
        total = [u + c for u, c in zip(used, layout.cost(ex))]
        if any(t > limit for t, (_, _, limit) in zip(total, layout.budgets)):
            if len(groups) == rows:
                break
            groups.append([])
            total = list(layout.cost(ex))
        groups[-1].append(ex)
        used = total
    for row, group in enumerate(groups):
        layout.write(batch, row, group)
    return batch, [ex for group in groups for ex in group]


def assert_trains_as_one_example_per_row(config, packed: dict, examples: list, layout) -> None:
    """The summed token loss of `packed` and its gradients equal the sums over `examples` run one per row (each
    alone in a 2-row batch of `layout`: one compilation)."""
    model = VLM(config.model)
    params = model.init(jax.random.PRNGKey(0), *dummy_inputs(config.model))["params"]
    total = float(packed["loss_mask"].sum())

    @jax.jit
    def summed(params, batch):
        """Sum of the masked token losses over the whole batch, and its gradients (divided by `total`)."""
        def loss(p):
            mean, count = masked_mean(forward_nll(model, {"params": p}, batch), batch["loss_mask"])
            return mean * count / total
        return jax.value_and_grad(loss)(params)

    want_loss, want_grads = summed(params, packed)
    got_loss, got_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
    for ex in examples:
        alone, _ = pack(layout, [ex], rows=2)
        loss, grads = summed(params, alone)
        got_loss, got_grads = got_loss + loss, jax.tree.map(jnp.add, got_grads, grads)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    flat_want, flat_got = jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)
    scale = max(float(jnp.abs(g).max()) for g in flat_want)
    for w, g in zip(flat_want, flat_got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("make_config", [tiny_config, navit_config, navit_mrope_config],
                         ids=["tiled", "navit", "navit-mrope"])
def test_packed_loss_and_grads_equal_one_example_per_row(make_config):
    config = make_config()
    layout = row_layout(config)
    dataset = make_example_dataset(config, TOK)
    packed, examples = pack(layout, [dataset[i] for i in range(12)], rows=2)
    per_row = packed["segment_ids"].max(axis=1)
    assert per_row.min() >= 1 and per_row.max() >= 2, per_row
    assert_trains_as_one_example_per_row(config, packed, examples, layout)


@pytest.mark.parametrize("window", [0, 7])
def test_navit_batch_contract_and_resume(window):
    config = navit_config("batch_size=4", f"data.pack_window={window}")
    b = first_batch(config, TOK)
    rows, n = 4, config.data.max_patches_per_row
    assert b["patches"].shape == (rows, n, 3 * 2 * 8 * 8) and b["image_dest"].shape == (rows, n // 4)
    image_id = special_ids(TOK).image
    for r in range(rows):
        windows = b["patch_segment_ids"][r, ::4]
        dest = b["image_dest"][r][windows > 0]
        # Every placeholder gets exactly one merge window, in order; padding windows point past the row.
        assert dest.tolist() == np.flatnonzero(b["tokens"][r] == image_id).tolist()
        assert (b["image_dest"][r][windows == 0] == config.data.seq_len).all()
        # Images never straddle a window; positions restart per image and per example.
        assert (b["patch_segment_ids"][r].reshape(-1, 4) == windows[:, None]).all()
        for s in range(1, b["patch_segment_ids"][r].max() + 1):
            assert b["patch_positions"][r][b["patch_segment_ids"][r] == s].min(axis=0).tolist() == [0, 0]
        for s in range(1, b["segment_ids"][r].max() + 1):
            assert b["positions"][r][b["segment_ids"][r] == s][0] == 0
    it = make_train_iterator(config, TOK)
    next(it)
    state = it.get_state()
    if window:  # the restore point falls inside a window
        assert state["states"]["0"]["window_rows_done"] > 0
    want = next(it)
    it.close()
    again = make_train_iterator(config, TOK)
    again.set_state(state)
    got = next(again)
    again.close()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_row_budgets_name_their_config_keys():
    config = navit_config("data.max_images_per_row=1", "data.max_patches_per_row=8")
    layout = row_layout(config)
    ex = make_example_dataset(config, TOK)[0]
    assert check_fits(ex, layout) == f"{ex.num_patches} patches exceed data.max_patches_per_row 8"
    with pytest.raises(ValueError, match="multiple of 4"):
        row_layout(navit_config("data.max_patches_per_row=10"))


def test_mrope_rows_hold_each_examples_own_ids():
    config = navit_mrope_config("data.pack_window=0")  # rows then take the example stream in order
    b = first_batch(config, TOK)
    dataset = make_example_dataset(config, TOK)
    assert b["positions"].shape == (config.batch_size, config.data.seq_len, 3)
    index, behind = 0, 0
    for row in range(config.batch_size):
        segs = b["segment_ids"][row]
        for s in range(1, segs.max() + 1):
            ex = dataset[index]
            index += 1
            np.testing.assert_array_equal(b["tokens"][row][segs == s], ex.tokens)
            want = example_mrope_positions(len(ex), ex.image_starts, [g for _, g in ex.images],
                                           config.model.connector.merge_size)
            np.testing.assert_array_equal(b["positions"][row][segs == s], want)
            behind += int(want.max()) + 1 < len(ex)  # an image puts the ids behind the token count
        assert (b["positions"][row][segs == 0] == 0).all()
    assert behind and index > config.batch_size  # non-trivial ids, and rows really hold several examples
    tiled = tiny_config()
    tiled.model.text.update(dict(rope_kind="mrope"))
    with pytest.raises(ValueError, match="NaViT image grids"):
        row_layout(tiled)


def test_mrope_model_trains_from_the_pipeline(tmp_path):
    train(navit_mrope_config("total_steps=2", "checkpoint_every=2"), str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 2 and np.isfinite(losses).all()
