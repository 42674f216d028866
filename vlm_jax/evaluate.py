"""Held-out VQA evaluation: batched greedy answers, exact match overall and per question type."""

import re
import string
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm_jax import image_inputs, parallel
from vlm_jax.data.image_kinds import report_image_processor
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.data.records import make_encoder
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.model import VLM

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def score(records: list[dict]) -> dict:
    """{"accuracy": overall, "accuracy_by_type": {qtype: acc}, "count_by_type": {...}}."""
    by_type: dict[str, list[bool]] = {}
    for r in records:
        by_type.setdefault(r["qtype"], []).append(
            normalize_answer(r["prediction"]) == normalize_answer(r["answer"]))
    hits = [h for v in by_type.values() for h in v]
    return {"accuracy": float(np.mean(hits)) if hits else 0.0,
            "accuracy_by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
            "count_by_type": {k: len(v) for k, v in sorted(by_type.items())}}


def answer_examples(config: ml_collections.ConfigDict, params: Any, tokenizer, examples: list[dict],
                    mesh) -> list[str]:
    """Greedy answers (decoded, stop token removed) for `examples`, batched by eval_batch_size."""
    model = VLM(config.model)
    stop_id = make_encoder(config, tokenizer).stop_id
    rows = config.eval_batch_size
    dp = parallel.data_parallel_size(mesh)
    if rows % dp:
        raise ValueError(f"eval_batch_size {rows} must divide by the data x fsdp mesh size {dp}")
    kind = image_inputs.make(config.model)
    stop = stop_sequences([[stop_id]])
    answer = jax.jit(lambda p, b: generate(
        model, p, b["tokens"], b["segment_ids"], b["images"], positions=b["positions"],
        max_new_tokens=config.max_new_tokens, stop=stop))
    answers = []
    sharding = parallel.batch_sharding(mesh)
    for start in range(0, len(examples), rows):
        chunk = examples[start:start + rows]
        batch = kind.pad_prompts(chunk, config, rows)
        batch = jax.device_put({k: batch[k] for k in ("tokens", "positions", "segment_ids")} |
                               dict(images=kind.select(batch)), sharding)
        with jax.set_mesh(mesh):
            out = np.asarray(jax.device_get(answer(params, batch)))
        for ids in out[:len(chunk)]:
            ids = list(ids)
            ids = ids[:ids.index(stop_id)] if stop_id in ids else ids
            answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def evaluate(config: ml_collections.ConfigDict, params: Any, tokenizer, mesh) -> tuple[dict, list]:
    """Scores `config.eval_examples` held-out examples; returns (scores, per-example records)."""
    report_image_processor(config)
    examples = make_eval_examples(config, tokenizer, config.eval_examples)
    predictions = answer_examples(config, params, tokenizer, examples, mesh)
    records = [dict(id=ex["id"], qtype=ex["qtype"], question=ex.get("question", ""),
                    answer=ex["answer"], prediction=p, image=ex["image"])
               for ex, p in zip(examples, predictions)]
    return score(records), records


def plot_examples(records: list[dict], out_png: str, n: int = 16) -> str:
    """A grid of held-out images with question, model answer and truth (green if right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = records[:n]
    cols = 4
    rows = (len(records) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, records):
        ax.imshow(np.asarray(r["image"]))
        ok = normalize_answer(r["prediction"]) == normalize_answer(r["answer"])
        ax.set_title(f"{r['question']}\nmodel: {r['prediction']}\ntruth: {r['answer']}", fontsize=8,
                     color="darkgreen" if ok else "firebrick")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
