"""Scores of a model's answers to a benchmark's questions, and the per-question records (docs/benchmarks.md)."""

from typing import Any

from vlm_jax.benchmarks.matching import exact_match, extract_option, vqa_accuracy
from vlm_jax.benchmarks.tsv import BenchmarkRow
from vlm_jax.errors import InputError

METRICS = ("mc", "vqa", "exact")


def records(asked: list[BenchmarkRow], predictions: list[str], metric: str) -> list[dict[str, Any]]:
    """One JSON-ready record per asked question (`questions`' output), in order: index, group, rotation, category,
    l2_category, question, then for "mc" its options, answer letter, the prediction, the letter extracted from it
    (`extract_option`, None when none) and hit (True or False); for "vqa" and "exact" the reference answers, the
    prediction and hit (`vqa_accuracy` or `exact_match`, a float)."""
    if metric not in METRICS:
        raise InputError(f"unknown benchmark metric {metric!r}: one of {', '.join(METRICS)}")
    if len(predictions) != len(asked):
        raise ValueError(f"{len(predictions)} predictions for {len(asked)} questions")
    out = []
    for row, prediction in zip(asked, predictions):
        record = dict(index=row.index, group=row.index if row.group is None else row.group, rotation=row.rotation,
                      category=row.category, l2_category=row.l2_category, question=row.question)
        if not row.answers:
            raise InputError(f"{row.where}: no answer to score against (column 'answer')")
        if metric == "mc":
            if not row.options:
                raise InputError(f"{row.where}: metric mc needs options (columns A, B, ...); this row has none")
            letter = extract_option(prediction, row.options)
            record.update(options=row.options, answer=row.answer, prediction=prediction, extracted=letter,
                          hit=letter == row.answer)
        elif metric == "vqa":
            if len(row.answers) < 2:
                raise InputError(f"{row.where}: metric vqa needs several answers per question (VQAv2 has 10), this "
                                 f"row has one in column 'answer'; metric exact scores single answers")
            record.update(answers=list(row.answers), prediction=prediction,
                          hit=vqa_accuracy(prediction, list(row.answers)))
        else:
            record.update(answers=list(row.answers), prediction=prediction,
                          hit=exact_match(prediction, list(row.answers)))
        out.append(record)
    return out


def score(asked: list[BenchmarkRow], predictions: list[str], metric: str) -> dict[str, Any]:
    """The scores of `predictions` (one per asked question) by `metric`:
    "mc": `accuracy` over every asked question (each rotation counted on its own), `circular_accuracy` over the
    original questions (right only when right on every rotation: VLMEvalKit's MMBench "Overall"), and per
    `category` (and l2-category, when the file has it) the circular accuracy, as VLMEvalKit reports MMBench;
    "vqa" (VQAv2 soft accuracy) and "exact" (normalised exact match): `accuracy` and `accuracy_by_category`.
    With the counts each is over."""
    done = records(asked, predictions, metric)
    if not done:
        raise InputError("no questions to score")
    result: dict[str, Any] = dict(metric=metric, accuracy=_mean([float(r["hit"]) for r in done]), count=len(done))
    if metric != "mc":
        return result | _by(done, "category")
    # One entry per original question, in first-asked order: right only when every rotation was.
    groups: dict[Any, dict[str, Any]] = {}
    for r in done:
        first = groups.setdefault(r["group"], dict(r, hit=True))
        first["hit"] = first["hit"] and r["hit"]
    result.update(circular_accuracy=_mean([float(g["hit"]) for g in groups.values()]), questions=len(groups))
    result |= _by(list(groups.values()), "category")
    if any(r["l2_category"] is not None for r in done):
        result |= _by(list(groups.values()), "l2_category")
    return result


def _by(scored: list[dict[str, Any]], key: str) -> dict[str, dict[str, float | int]]:
    split: dict[str, list[float]] = {}
    for s in scored:
        if s[key] is not None:
            split.setdefault(s[key], []).append(float(s["hit"]))
    return {f"accuracy_by_{key}": {k: _mean(v) for k, v in sorted(split.items())},
            f"count_by_{key}": {k: len(v) for k, v in sorted(split.items())}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
