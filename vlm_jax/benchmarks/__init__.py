"""VLMEvalKit-style benchmark files and their scoring (docs/benchmarks.md). Driven as:
rows = read_tsv(path); asked = questions(rows, circular); texts = [mc_prompt(q) for q in asked] (or vqa_prompt);
predictions = the model's replies; score(asked, predictions, metric) and records(asked, predictions, metric)."""

from vlm_jax.benchmarks.matching import exact_match, extract_option, normalize_vqa_answer, vqa_accuracy
from vlm_jax.benchmarks.questions import circular_rotations, mc_prompt, questions, vqa_prompt
from vlm_jax.benchmarks.scoring import METRICS, records, score
from vlm_jax.benchmarks.tsv import BenchmarkRow, load_images, read_tsv

__all__ = ["BenchmarkRow", "METRICS", "circular_rotations", "exact_match", "extract_option", "load_images",
           "mc_prompt", "normalize_vqa_answer", "questions", "read_tsv", "records", "score", "vqa_accuracy",
           "vqa_prompt"]
