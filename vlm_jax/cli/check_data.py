"""Check a run's data before training: vlm-check-data --config FILE[:ARG] [--config.KEY=VALUE ...]

Reads every record of the training source, and of the evaluation source when the config has one (llava_json or
array_record with data.eval_path, or the synthetic source), as the run would: each record parsed, its images fully
decoded and converted, its conversation tokenised with the run's tokenizer, and the example checked against a row's
packing budgets (the evaluation prompts against a generation row's). Lists each bad record and each example that can
never fit a row (file, index, id, reason) on stdout, then prints one JSON line of counts: records, bad, too long and
without an image, per source. With data.mixture each of its sources is checked in turn and named: its lines say
`train/<name>` and its counts are the JSON's `train/<name>`. Exit status 1 when any record is bad (a run with the
default data.on_bad_record=raise would stop on it), else 0; over-long examples alone (data.skip_too_long) leave it
0. Records are read in data.threads threads.
"""

import concurrent.futures
import json

import ml_collections

from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.config import check_values
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.packing import Example, check_fits
from vlm_jax.data.mixture import training_sources
from vlm_jax.data.pipeline import BadRecord, PromptExample, ReadExample, make_source, row_layout
from vlm_jax.data.tokenizer import run_tokenizer
from vlm_jax.errors import BadRecordError, InputError

_CHUNK = 256  # records in flight at once: the examples of a chunk are held until it is counted


def _prompt(to_prompt: PromptExample):
    """Eval record index -> its prompt, or the BadRecord of a record that cannot be used."""
    def read(index: int):
        try:
            return to_prompt(index)
        except BadRecordError as e:
            return BadRecord(e)
    return read


def scan(config: ml_collections.ConfigDict, tokenizer, split: str, label: str = "") -> dict[str, int]:
    """Reads every record of the `split` ("train" or "eval") source as a run would, printing one line for each bad
    or over-long one, which says `label` (default: the split); returns the counts of its records, bad ones,
    over-long ones and those without an image. A mixture's source is scanned with its TrainingSource.config."""
    label = label or split
    kind = data_kind(config.model)
    source = make_source(config, split, keep_bad=True)  # every bad record reported, not the first alone
    if split == "train":
        read, layout = ReadExample(source, kind.record_to_example(config, tokenizer)), row_layout(config)
    else:
        read, layout = _prompt(PromptExample(config, tokenizer, source)), row_layout(config, grouped=False)
    counts = dict(records=len(source), bad=0, too_long=0, without_image=0)
    with concurrent.futures.ThreadPoolExecutor(config.data.threads) as pool:
        for start in range(0, len(source), _CHUNK):
            indices = range(start, min(start + _CHUNK, len(source)))
            for index, ex in zip(indices, pool.map(read, indices)):
                if isinstance(ex, BadRecord):
                    counts["bad"] += 1
                    print(f"bad ({label}): {ex.error}", flush=True)
                    continue
                problem = kind.prompt_problem(ex, layout) if split == "eval" else check_fits(ex, layout)
                if problem:
                    counts["too_long"] += 1
                    print(f"too long ({label}): {source.where(index)}: {problem}", flush=True)
                if not _images(ex):
                    counts["without_image"] += 1
    return counts


def _images(ex) -> int:
    """Images (or image views) of a training example or an eval prompt."""
    if isinstance(ex, dict):
        return len(ex["tiles"]) if "tiles" in ex else len(ex["images"])
    return len(ex.tiles) if isinstance(ex, Example) else len(ex.images)


def has_eval(config: ml_collections.ConfigDict) -> bool:
    """Whether the config has an evaluation source to check."""
    return config.data.source == "synthetic" or bool(config.data.eval_path)


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv, workdir=False, distributed=False)
    with reported_errors():
        try:
            check_values(config)
        except ValueError as e:
            raise InputError(str(e)) from None
        tokenizer = run_tokenizer(config)
        summary = dict(config=args.config)
        if config.data.mixture:
            for source in training_sources(config):
                label = f"train/{source.name}"
                summary[label] = scan(source.config, tokenizer, "train", label)
        else:
            summary["train"] = scan(config, tokenizer, "train")
        if has_eval(config):
            summary["eval"] = scan(config, tokenizer, "eval")
        bad = sum(part["bad"] for name, part in summary.items() if name != "config")
        print(json.dumps(summary), flush=True)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
