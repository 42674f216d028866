"""A benchmark file asked of a model: its questions (rotated for circular multiple choice) as prompts with their
images, answered greedily a batch at a time, then scored (docs/benchmarks.md)."""

from typing import Any

from vlm_jax.benchmarks.questions import mc_prompt, questions, vqa_prompt
from vlm_jax.benchmarks.scoring import METRICS, records, score
from vlm_jax.benchmarks.tsv import BenchmarkRow, load_images, read_tsv
from vlm_jax.data.conversation import HUMAN
from vlm_jax.errors import InputError
from vlm_jax.inference import Assistant


def file_metric(rows: list[BenchmarkRow], path: str) -> str:
    """The metric a file's rows call for: "mc" with option columns, "vqa" with several answers a question (VQAv2,
    TextVQA), else "exact" (GQA-style single answers)."""
    if not rows:
        raise InputError(f"{path}: no rows")
    if any(r.options for r in rows):
        return "mc"
    return "vqa" if all(len(r.answers) > 1 for r in rows) else "exact"


def run_benchmark(assistant: Assistant, path: str, metric: str = "auto",
                  circular: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scores, one record per asked question) of `assistant` on the TSV file `path`: `metric` one of METRICS or
    "auto" (`file_metric`); multiple choice is asked once per rotation of its options unless not `circular`. The
    images of one batch (config.eval_batch_size questions) are decoded at a time."""
    rows = read_tsv(path)
    if metric == "auto":
        metric = file_metric(rows, path)
    if metric not in METRICS:
        raise InputError(f"unknown benchmark metric {metric!r}: auto or one of {', '.join(METRICS)}")
    asked = questions(rows, circular and metric == "mc")
    text = mc_prompt if metric == "mc" else vqa_prompt
    predictions, size = [], assistant.config.eval_batch_size
    for start in range(0, len(asked), size):
        prompts = [assistant.prompt([(HUMAN, text(q))], load_images(q), q.where) for q in asked[start:start + size]]
        predictions += [c.text for c in assistant.generate(prompts)]
    return score(asked, predictions, metric), records(asked, predictions, metric)
