"""KV-cache generation with an M-RoPE decoder (Qwen2-VL): cache slots and RoPE positions part ways after an
image. Greedy tokens equal re-running the uncached forward with the full sequence's M-RoPE ids, and equal
transformers' Qwen2VLForConditionalGeneration.generate; eval examples and prompt batches carry the ids."""

import functools
import math

import jax
import numpy as np
import torch
import transformers

from configs.base import get_config
from tests.test_interop_qwen2vl import BASE, MESH, _tiny_qwen2_vl
from tests.test_model_vlm import random_params
from tests.test_packing import TOK, navit_mrope_config
from vlm_jax.data.navit import example_mrope_positions, mrope_positions
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.inference import Assistant
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.interop.hf_import import Source, import_params, model_config
from vlm_jax.image_inputs import dummy_inputs, make
from vlm_jax.model import VLM
from vlm_jax.params import unflat

NEW = 6
IMAGE_ID, EOS = 90, 1  # _tiny_qwen2_vl's image and end tokens; text is drawn below the image token
# One prompt per row: a run of text tokens, or one image's grid (t, h, w) in patches. Images of different sizes
# and aspect ratios (M-RoPE ids then fall behind the token count by different amounts), and a text-only row.
PROMPTS = ([3, (1, 4, 6), 4], [2, (1, 2, 2), 3, (1, 6, 4), 2], [6])
LP = 16  # prompt buffer


def mrope_config():
    """demo_navit shrunk, its decoder on M-RoPE, for prompts of up to LP tokens."""
    return navit_mrope_config(f"data.seq_len={LP}", "data.max_patches_per_row=56", "eval_batch_size=8",
                              f"max_new_tokens={NEW}")


def _examples(pieces_per_row, patch_dim: int, seed: int = 0) -> list[dict]:
    """Eval-example dicts (make_eval_examples' keys) of random text and random patches laid out as `pieces`."""
    rng = np.random.default_rng(seed)
    out = []
    for row, pieces in enumerate(pieces_per_row):
        tokens, images, starts = [], [], []
        for piece in pieces:
            if isinstance(piece, int):
                tokens += rng.integers(EOS + 1, IMAGE_ID, piece).tolist()
                continue
            starts.append(len(tokens))
            tokens += [IMAGE_ID] * (math.prod(piece) // 4)
            images.append((rng.standard_normal((math.prod(piece), patch_dim)).astype(np.float32), piece))
        image_positions = np.concatenate([s + np.arange(math.prod(g) // 4) for s, (_, g) in zip(starts, images)]
                                         or [np.zeros((0,), np.int64)])
        out.append(dict(id=str(row), tokens=np.asarray(tokens, np.int32), images=images,
                        image_positions=image_positions.astype(np.int32), positions=mrope_positions(pieces)))
    return out


def _uncached_greedy(forward, batch: dict, pieces_per_row) -> np.ndarray:
    """Greedy ids [B, NEW] from re-running `forward` (tokens, positions, segment_ids -> logits) on the whole
    growing sequence, the generated tokens continuing each prompt's last text run in its M-RoPE ids."""
    rows = np.arange(len(pieces_per_row))
    lengths = batch["segment_ids"].sum(axis=1)
    tokens = np.zeros((len(rows), LP + NEW), np.int32)
    tokens[:, :LP] = batch["tokens"]
    out = np.zeros((len(rows), NEW), np.int32)
    for i in range(NEW):
        positions = np.zeros((len(rows), LP + NEW, 3), np.int32)
        for row, pieces in enumerate(pieces_per_row):
            positions[row, :lengths[row] + i] = mrope_positions(pieces[:-1] + [pieces[-1] + i])
        segment_ids = (np.arange(LP + NEW)[None] < (lengths + i)[:, None]).astype(np.int32)
        logits = np.asarray(forward(tokens, positions, segment_ids))[rows, lengths + i - 1]
        out[:, i] = tokens[rows, lengths + i] = logits.argmax(-1)
    return out


def test_example_mrope_positions_from_image_starts():
    for pieces in PROMPTS:
        starts, at = [], 0
        for piece in pieces:
            if not isinstance(piece, int):
                starts.append(at)
            at += piece if isinstance(piece, int) else math.prod(piece) // 4
        grids = [p for p in pieces if not isinstance(p, int)]
        np.testing.assert_array_equal(example_mrope_positions(at, starts, grids), mrope_positions(pieces))


def test_cached_greedy_equals_uncached_greedy():
    config = mrope_config()
    model = VLM(config.model)
    v = config.model.vision
    examples = _examples(PROMPTS, 3 * v.temporal_patch_size * v.patch_size ** 2)
    kind = make(config.model)
    batch = kind.pad_prompts(examples, config, len(PROMPTS))
    assert batch["positions"].shape == (len(PROMPTS), LP, 3)
    lengths = batch["segment_ids"].sum(axis=1)
    # Slots and RoPE positions differ after an image: the test would catch the one standing in for the other.
    assert (batch["positions"].max(axis=(1, 2)) + 1 < lengths).tolist() == [True, True, False]

    images = kind.select(batch)
    params = random_params(model, batch["tokens"], batch["positions"], batch["segment_ids"], images)
    forward = jax.jit(lambda *a: model.apply({"params": params}, *a, images))
    want = _uncached_greedy(forward, batch, PROMPTS)
    assert len(set(map(tuple, want))) == len(PROMPTS)  # rows really differ

    cached = jax.jit(functools.partial(generate, model, max_new_tokens=NEW, stop=stop_sequences([])))
    got = cached(params, batch["tokens"], batch["segment_ids"], images, positions=batch["positions"])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_greedy_equals_transformers_generate(tmp_path):
    path = _tiny_qwen2_vl(tmp_path)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    source = Source(path)
    assert source.family == "qwen2_vl"
    model = model_config([source], BASE, "float32")
    model.dtype = "float32"
    params = unflat(import_params([source], model, MESH))
    config = get_config()
    config.model = model
    config.data.update(dict(seq_len=LP, max_patches_per_row=56))
    examples = _examples(PROMPTS, 1176, seed=1)
    kind = make(model)
    batch = kind.pad_prompts(examples, config, len(PROMPTS))
    got = jax.jit(functools.partial(generate, VLM(model), max_new_tokens=NEW, stop=stop_sequences([[EOS]])))(
        params, batch["tokens"], batch["segment_ids"], kind.select(batch), positions=batch["positions"])

    for row, ex in enumerate(examples):
        ids = torch.from_numpy(ex["tokens"].astype(np.int64))[None]
        vision = {}
        if ex["images"]:
            vision = dict(pixel_values=torch.from_numpy(np.concatenate([p for p, _ in ex["images"]])),
                          image_grid_thw=torch.tensor([g for _, g in ex["images"]]),
                          mm_token_type_ids=(ids == IMAGE_ID).long())
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0, **vision)
        want = out[0, ids.shape[1]:].tolist()
        assert np.asarray(got)[row].tolist() == want + [0] * (NEW - len(want)), row


def test_eval_examples_carry_mrope_positions_and_answer():
    config = mrope_config()
    config.data.update(dict(seq_len=128, max_patches_per_row=128))
    examples = make_eval_examples(config, TOK, 4)
    for ex in examples:
        (_, grid), = ex["images"]
        start = int(ex["image_positions"][0])
        run = math.prod(grid) // 4
        want = mrope_positions([start, grid, len(ex["tokens"]) - start - run])
        np.testing.assert_array_equal(ex["positions"], want)
    batch = make(config.model).pad_prompts(examples, config, config.eval_batch_size)
    assert batch["positions"].shape == (8, 128, 3)

    inputs = dummy_inputs(config.model)
    assert inputs[1].shape == (1, 8, 3)
    params = random_params(VLM(config.model), *inputs)
    answers = [c.text for c in Assistant(config, params, TOK, MESH).generate(examples)]
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
