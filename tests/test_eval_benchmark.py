"""vlm-eval --benchmark on VLMEvalKit-style TSV files the test writes (multiple choice asked circularly, VQA soft
accuracy, exact match), with the model's config, template and preprocessing taken from the checkpoint; and
eval_every, which logs the same scores during training into metrics.jsonl and TensorBoard."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image, ImageDraw

from tests.helpers import tiny_config
from vlm_jax.benchmarks import mc_prompt, questions, read_tsv, vqa_prompt
from vlm_jax.cli import eval as eval_cli
from vlm_jax.data.conversation import HUMAN
from vlm_jax.errors import InputError
from vlm_jax.evaluate import evaluate, training_eval
from vlm_jax.inference import Assistant
from vlm_jax.train import loop

pytestmark = pytest.mark.usefixtures("loaded_once")


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    image = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(image).rectangle((6, 6, size[0] - 6, size[1] - 6), fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def write_mc(path) -> str:
    """Three 4-option questions in two categories; the third reuses the first's image by its index."""
    rows = [dict(index=0, question="What colour is the square?", hint="", A="red", B="green", C="blue", D="black",
                 answer="A", category="colour", image=_png((72, 40), (220, 30, 30))),
            dict(index=1, question="What shape is it?", hint="Look at the middle.", A="disc", B="square",
                 C="star", D="line", answer="B", category="shape", image=_png((40, 60), (30, 30, 220))),
            dict(index=2, question="Is it bright?", hint="", A="yes", B="no", C="maybe", D="dark", answer="A",
                 category="colour", image="0")]
    _write(path, rows)
    return str(path)


def _write(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def _eval(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    eval_cli.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_multiple_choice_is_asked_circularly_and_scored_per_category(tiny_run, tmp_path, capsys):
    tsv = write_mc(tmp_path / "mc.tsv")
    out = str(tmp_path / "pred.jsonl")
    result = _eval(["--workdir", tiny_run, "--benchmark", tsv, "--output", out], capsys)
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 12 and sorted({r["rotation"] for r in records}) == [0, 1, 2, 3]
    assert result["step"] == 2 and result["metric"] == "mc" and result["questions"] == 3
    assert result["accuracy"] == sum(r["hit"] for r in records) / 12
    right = {g: all(r["hit"] for r in records if r["group"] == g) for g in (0, 1, 2)}
    assert result["circular_accuracy"] == sum(right.values()) / 3
    assert result["accuracy_by_category"] == {"colour": (right[0] + right[2]) / 2, "shape": float(right[1])}
    # The predictions are the model's own greedy answers to LLaVA's prompt for each rotation, with its image.
    assistant = Assistant.load(tiny_run)
    asked = questions(read_tsv(tsv), circular=True)
    q = asked[5]
    [want] = assistant.generate([assistant.prompt([(HUMAN, mc_prompt(q))], [Image.open(io.BytesIO(q.images[0]))])])
    assert records[5]["prediction"] == want.text and records[5]["options"] == q.options
    assert "Look at the middle.\nWhat shape is it?\nA. " in mc_prompt(q)
    once = _eval(["--workdir", tiny_run, "--benchmark", tsv, "--output", out, "--no_circular"], capsys)
    assert once["count"] == 3


def test_open_questions_take_vqa_soft_accuracy_or_exact_match(tiny_run, tmp_path, capsys):
    image = _png((50, 50), (20, 160, 20))
    vqa = tmp_path / "vqa.tsv"
    _write(vqa, [dict(index=i, question=f"What is {i}?", answer=str(["green"] * 3 + ["grey"] * 7), category="c",
                      image=image) for i in range(2)])
    result = _eval(["--workdir", tiny_run, "--benchmark", str(vqa)], capsys)
    assert result["metric"] == "vqa" and "circular_accuracy" not in result
    with open(os.path.join(tiny_run, "vqa_predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["answers"] for r in records] == [["green"] * 3 + ["grey"] * 7] * 2
    assert result["accuracy"] == sum(r["hit"] for r in records) / 2
    assistant = Assistant.load(tiny_run)
    rows = read_tsv(str(vqa))
    assert vqa_prompt(rows[0]).endswith("\nAnswer the question using a single word or phrase.")
    exact = tmp_path / "gqa.tsv"
    _write(exact, [dict(index=0, question="Colour?", answer="green", image=image)])
    assert _eval(["--workdir", tiny_run, "--benchmark", str(exact)], capsys)["metric"] == "exact"
    assert assistant.config.data.template == "vicuna_v1"


def test_a_bad_benchmark_file_is_one_error_line(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    _write(bad, [dict(index=0, question="q", A="x", B="y", answer="C", image=_png((20, 20), (0, 0, 0)))])
    with pytest.raises(SystemExit) as done:
        eval_cli.main(["--workdir", tiny_run, "--benchmark", str(bad)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert done.value.code == 1 and last.startswith(f"error: {bad}") and "answer" in last and "Traceback" not in err


def test_eval_every_logs_the_benchmark_scores_while_training(tmp_path):
    tsv = write_mc(tmp_path / "mc.tsv")
    common = ["total_steps=2", "eval_every=1", "eval_batch_size=8", "max_new_tokens=2"]
    loop.train(tiny_config(*common, f"eval_benchmark={tsv}"), str(tmp_path / "bench"))
    with open(tmp_path / "bench" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert 0 <= r["eval_circular_accuracy"] <= r["eval_accuracy"] <= 1
        assert set(k for k in r if k.startswith("eval_accuracy_by_category/")) == {
            "eval_accuracy_by_category/colour", "eval_accuracy_by_category/shape"}
    with pytest.raises(InputError, match="nothing.tsv"):
        loop.train(tiny_config(*common, f"eval_benchmark={tmp_path / 'nothing.tsv'}"), str(tmp_path / "none"))
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_eval_every_without_a_benchmark_scores_the_held_out_questions(tiny_run):
    assistant = Assistant.load(tiny_run)
    scores = training_eval(assistant)
    want, _ = evaluate(assistant, assistant.config.eval_examples)
    assert scores == {"eval_accuracy": want["accuracy"]} | {
        f"eval_accuracy_by_type/{k}": v for k, v in want["accuracy_by_type"].items()}
