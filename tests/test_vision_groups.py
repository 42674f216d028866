"""Rows in groups sharing their vision rows (data.vision_group_rows): the planner keeps every budget and places
every example once; a group's examples may have their images in another row's vision row and still train exactly
as one example per row; the grouped iterator keeps the batch contract and resumes across carried examples;
micro-batches and eval keep groups whole."""

import math

import jax
import numpy as np
import pytest

from tests.helpers import first_batch, tiny_config
from tests.test_packing import TOK, assert_trains_as_one_example_per_row, navit_config, navit_mrope_config
from vlm_jax import parallel
from vlm_jax.data.packing import NavitRows, PlannedGroup, plan_groups
from vlm_jax.data.pipeline import make_eval_examples, make_example_dataset, make_train_iterator, row_layout
from vlm_jax.data.tokenizer import special_ids
from vlm_jax.image_inputs import make
from vlm_jax.train import loop
from vlm_jax.train.step import make_train_step, split_micro_batches


MESH = ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")  # 4 rows a device: 2 groups of 2, in 2 micro-batches


def check_plan(groups, left, tokens, images, layout):
    """Every budget of every text and vision row holds, and each example sits in exactly one group, or is left,
    with its text in one row and each of its images in one vision row of the same group."""
    per_row = {key: limit for _, key, limit in layout.budgets}
    seen = list(left)
    for group in groups:
        assert len(group.rows) == len(group.vision) == layout.group
        members = [i for row in group.rows for i in row]
        seen += members
        for row in group.rows:
            assert sum(tokens[i] for i in row) <= layout.seq_len
            assert len(row) <= per_row["data.max_examples_per_row"]
        for vision in group.vision:
            assert sum(images[i][j] for i, j in vision) <= layout.max_patches
            assert len(vision) <= per_row["data.max_images_per_row"]
        placed = sorted(pair for vision in group.vision for pair in vision)
        assert placed == sorted((i, j) for i in members for j in range(len(images[i])))
    assert sorted(seen) == list(range(len(tokens)))


@pytest.mark.parametrize("group", [1, 4])
def test_plan_groups_keeps_every_budget_and_places_every_example_once(group):
    rng = np.random.default_rng(group)
    layout = NavitRows(seq_len=64, max_patches_per_row=96, max_images_per_row=3, patch_dim=1, merge_size=2,
                       max_examples_per_row=4, group=group)
    n = 300
    tokens = rng.integers(4, 64, n).tolist()
    images = [rng.integers(4, 32, rng.integers(0, 4)).tolist() for _ in range(n)]  # each fits one vision row
    groups, left = plan_groups(tokens, images, layout, carried=20)
    check_plan(groups, left, tokens, images, layout)
    assert left and not set(left) & set(range(20))  # some wait for the next window; the carried never wait twice
    assert (groups, left) == plan_groups(tokens, images, layout, carried=20)  # deterministic
    flushed, rest = plan_groups(tokens, images, layout, flush=True)
    check_plan(flushed, rest, tokens, images, layout)
    assert rest == []
    text = sum(tokens) / (len(flushed) * group * layout.seq_len)
    vision = sum(map(sum, images)) / (len(flushed) * group * layout.max_patches)
    assert max(text, vision) > 0.9, (text, vision)


def test_images_in_another_rows_vision_row_train_as_one_example_per_row():
    """Group of 2 rows with every example's images in the other row's vision row: the loss and gradients are
    those of the examples run one per row (M-RoPE decoder: each example's own 3-axis ids, too)."""
    config = navit_mrope_config("data.vision_group_rows=2")
    grouped, alone = row_layout(config), row_layout(config, grouped=False)
    dataset = make_example_dataset(config, TOK)
    examples = [ex for ex in (dataset[i] for i in range(40)) if ex.images][:4]
    assert len(examples) == 4
    plan = PlannedGroup(rows=[[0, 1], [2, 3]], vision=[[(2, 0), (3, 0)], [(0, 0), (1, 0)]])
    for row in plan.rows:
        assert sum(len(examples[i]) for i in row) <= config.data.seq_len
    for vision in plan.vision:
        assert sum(examples[i].num_patches for i, _ in vision) <= config.data.max_patches_per_row
    packed = grouped.empty(2)
    grouped.write_group(packed, 0, examples, plan)
    n = config.data.max_patches_per_row // 4
    assert packed["image_dest"].shape == (1, 2 * n)
    # Row 0's vision windows point into row 1's text (flat positions >= L) and the other way round.
    length = config.data.seq_len
    valid = packed["patch_segment_ids"][:, ::4].reshape(-1) > 0
    dest = packed["image_dest"][0]
    assert (dest[:n][valid[:n]] >= length).all() and (dest[n:][valid[n:]] < length).all()
    image_id = special_ids(TOK).image
    assert sorted(dest[valid].tolist()) == np.flatnonzero(packed["tokens"].reshape(-1) == image_id).tolist()

    assert_trains_as_one_example_per_row(config, packed, examples, alone)


def test_grouped_iterator_keeps_the_contract_and_resumes_across_carried_examples():
    config = navit_config("batch_size=4", "data.vision_group_rows=2", "data.pack_window=9")
    n, length = config.data.max_patches_per_row // 4, config.data.seq_len
    image_id = special_ids(TOK).image
    it = make_train_iterator(config, TOK)
    states, batches = [it.get_state()], []
    for _ in range(8):
        batches.append(next(it))
        states.append(it.get_state())
    it.close()
    shard0 = [s["states"]["0"] for s in states]  # the one data shard's
    assert any(s["carried"] for s in shard0) and any(s["window_rows_done"] for s in shard0)
    for b in batches:
        assert b["image_dest"].shape == (2, 2 * n) and b["patches"].shape[:2] == (4, 4 * n)
        for group in range(2):
            windows = b["patch_segment_ids"][2 * group:2 * group + 2, ::4].reshape(-1)
            dest = b["image_dest"][group]
            tokens = b["tokens"][2 * group:2 * group + 2].reshape(-1)
            # Every placeholder of the group's rows gets exactly one merge window; padding windows are dropped.
            assert sorted(dest[windows > 0].tolist()) == np.flatnonzero(tokens == image_id).tolist()
            assert (dest[windows == 0] == 2 * length).all()
    # Resuming from a state inside a window, and from one holding carried examples, replays the same batches.
    for k in sorted({next(k for k, s in enumerate(shard0) if s["carried"]),
                     next(k for k, s in enumerate(shard0) if s["window_rows_done"])}):
        again = make_train_iterator(config, TOK)
        again.set_state(states[k])
        for want in batches[k:k + 2]:
            got = next(again)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        again.close()


def test_grouped_rows_need_a_window_and_whole_groups_per_device():
    with pytest.raises(ValueError, match="data.pack_window"):
        make_train_iterator(navit_config("data.vision_group_rows=2", "data.pack_window=0"), TOK)
    mesh = loop.Setup(navit_config(), None).mesh  # 8 devices on the batch
    with pytest.raises(ValueError, match="vision_group_rows=2"):
        loop.check_batch_size(navit_config("batch_size=8", "data.vision_group_rows=2"), mesh)
    loop.check_batch_size(navit_config("batch_size=16", "data.vision_group_rows=2"), mesh)
    with pytest.raises(ValueError, match="tiled rows"):
        row_layout(tiny_config("data.vision_group_rows=2"))


def test_micro_batches_and_eval_keep_groups_whole():
    config = navit_config("batch_size=16", "data.vision_group_rows=2", "micro_batches=2", *MESH)
    loop.check_batch_size(config, loop.Setup(config, None).mesh)
    mesh = loop.Setup(config, None).mesh
    rows = np.arange(16 * 3).reshape(16, 3)
    groups = np.arange(8 * 5).reshape(8, 5)
    batch = parallel.global_batch({"tokens": rows, "image_dest": groups}, mesh)
    split = jax.jit(lambda b: split_micro_batches(b, 2, mesh))(batch)
    # Micro-batch i takes groups i, i + 2, ... and exactly those groups' rows.
    np.testing.assert_array_equal(np.asarray(split["image_dest"]), np.stack([groups[0::2], groups[1::2]]))
    want = np.stack([rows.reshape(8, 2, 3)[i::2].reshape(8, 3) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(split["tokens"]), want)
    # Eval batches hold one prompt per row: never grouped.
    examples = make_eval_examples(config, TOK, 4)
    prompts = make(config.model).pad_prompts(examples, config, 4)
    assert prompts["image_dest"].shape == (4, config.data.max_patches_per_row // 4)


def test_grouped_batch_steps_on_the_mesh_in_micro_batches():
    """A grouped pipeline batch on 8 devices (fsdp 2 x tensor 4): one step in 2 micro-batches gives the one-pass
    loss."""
    config = navit_config("batch_size=8", "data.vision_group_rows=2", "data.pack_window=32", "micro_batches=2",
                          "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4")
    setup = loop.Setup(config)
    loop.check_batch_size(config, setup.mesh)
    batch = first_batch(config, TOK)
    assert batch["image_dest"].shape == (4, 2 * config.data.max_patches_per_row // 4)
    losses = []
    for micro in (1, 2):
        step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, micro_batches=micro)
        _, metrics = step(setup.fresh_state(), parallel.global_batch(batch, setup.mesh))
        losses.append(float(metrics["loss"]))
    assert math.isfinite(losses[0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
