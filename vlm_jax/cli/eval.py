"""Evaluate a checkpoint:
vlm-eval (--workdir W[@STEP] | --params CKPT_DIR) [--benchmark FILE.tsv [--metric mc|vqa|exact]] [--output FILE]

The model's config, chat template, tokenizer and image preprocessing come from the checkpoint (a run's saved
config, or an import's family; vlm_jax/inference.py); --config FILE replaces that config but for the model, and
--config.KEY=VALUE overrides either.

Without --benchmark: the config's held-out questions (data.eval_path, or the synthetic eval split), config.eval_examples
of them, scored by normalised exact match; prints one JSON line with `accuracy`, `accuracy_by_type` and
`count_by_type`, writes the predictions (default W/eval_predictions.jsonl, or beside the --params directory) and a
grid of examples with their answers (the same name, .png).

With --benchmark FILE.tsv: a benchmark in VLMEvalKit's TSV layout (index, question, hint, A, B, ..., answer,
category, base64 image; docs/benchmarks.md), asked with LLaVA's evaluation prompts. --metric mc (multiple choice:
the option letter read from each answer as VLMEvalKit reads it; every question asked once per rotation of its
options, MMBench's circular evaluation, unless --no_circular), vqa (VQAv2's soft accuracy over its ten answers, with
the official answer normalisation) or exact (normalised exact match: GQA, single-answer sets); auto (the default)
picks from the file's columns. Prints one JSON line with `accuracy`, for mc `circular_accuracy`, and
`accuracy_by_category`; writes every prediction (default W/FILE_predictions.jsonl, FILE the benchmark's name).
"""

import argparse
import json
import os

from vlm_jax.benchmarks import METRICS
from vlm_jax.benchmarks.run import run_benchmark
from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.cli.chat import add_model_arguments
from vlm_jax.evaluate import evaluate, plot_examples
from vlm_jax.files import replace_file
from vlm_jax.inference import Assistant, inference_config


def _arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--benchmark", default=None, help="a VLMEvalKit-style TSV file (default: the held-out questions)")
    p.add_argument("--metric", default="auto", choices=("auto", *METRICS), help="with --benchmark")
    p.add_argument("--no_circular", action="store_true", help="multiple choice: ask each question once")
    p.add_argument("--output", default=None, help="the predictions' JSONL file (default: see above)")


def _write_jsonl(path: str, records: list[dict]) -> None:
    replace_file(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    args, _ = parse(__doc__.splitlines()[0], argv, _arguments, workdir=False, config_optional=True)
    with reported_errors():
        source = args.workdir or args.params
        assistant = Assistant.load(source, inference_config(source, args.config, args.overrides))
        folder = source.partition("@")[0] if args.workdir else os.path.dirname(os.path.abspath(source))
        name = os.path.splitext(os.path.basename(args.benchmark))[0] if args.benchmark else "eval"
        if not args.workdir:
            name = f"{os.path.basename(os.path.normpath(source))}_{name}"
        output = args.output or os.path.join(folder, f"{name}_predictions.jsonl")
        which = {"step": assistant.step} if args.workdir else {"params": source}
        if args.benchmark:
            scores, records = run_benchmark(assistant, args.benchmark, args.metric, not args.no_circular)
            _write_jsonl(output, records)
            print(json.dumps({**which, "benchmark": args.benchmark, **scores}), flush=True)
            return
        scores, records = evaluate(assistant, assistant.config.eval_examples)
        _write_jsonl(output, [{k: v for k, v in r.items() if k != "image"} for r in records])
        plot_examples(records, os.path.splitext(output)[0].removesuffix("_predictions") + "_examples.png")
        print(json.dumps({**which, **scores}), flush=True)


if __name__ == "__main__":
    main()
