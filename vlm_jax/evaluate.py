"""Held-out VQA evaluation: batched greedy answers, exact match overall and per question type."""

import re
import string

import numpy as np

from vlm_jax.benchmarks.run import run_benchmark
from vlm_jax.data.image_kinds import report_image_processor
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.inference import Assistant

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


def evaluate(assistant: Assistant, n: int) -> tuple[dict, list]:
    """Scores the first `n` held-out examples of the assistant's config (data.eval_path, or the synthetic eval
    split), greedily; returns (scores, per-example records)."""
    config = assistant.config
    report_image_processor(config)
    examples = make_eval_examples(config, assistant.tokenizer, n)
    predictions = [c.text for c in assistant.generate(examples)]
    records = [dict(id=ex["id"], qtype=ex["qtype"], question=ex.get("question", ""),
                    answer=ex["answer"], prediction=p, image=ex["image"])
               for ex, p in zip(examples, predictions)]
    return score(records), records


def training_eval(assistant: Assistant) -> dict[str, float]:
    """What `eval_every` logs: the scores of config.eval_benchmark (or of eval_examples held-out questions) as flat
    metrics, `eval_accuracy`, `eval_circular_accuracy` and one `eval_accuracy_by_category/NAME` each."""
    config = assistant.config
    if config.eval_benchmark:
        scores, _ = run_benchmark(assistant, config.eval_benchmark, config.eval_metric)
    else:
        scores, _ = evaluate(assistant, config.eval_examples)
    flat = {f"eval_{k}": v for k, v in scores.items() if k in ("accuracy", "circular_accuracy")}
    for k, v in scores.items():
        if k.startswith("accuracy_by_"):
            flat.update({f"eval_{k}/{name}": x for name, x in v.items()})
    return flat


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
        if r["image"] is not None:  # a text-only example shows its question alone
            ax.imshow(np.asarray(r["image"]))
        ok = normalize_answer(r["prediction"]) == normalize_answer(r["answer"])
        ax.set_title(f"{r['question']}\nmodel: {r['prediction']}\ntruth: {r['answer']}", fontsize=8,
                     color="darkgreen" if ok else "firebrick")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
