"""configs/demo_navit.py, shrunk: launch/train.py (the vlm-train command) pretrains its NaViT tower (stage 0, on
packed labelled rows) through the demo's module, then trains the VLM a few steps on packed native-resolution
batches, and launch/eval.py answers held-out questions with it (generation on NaViT prompts), through the same
loop as the tiled demo."""

import json
import os
import runpy
import sys

import numpy as np

from tests.helpers import ROOT, TINY

SMALL = TINY + ["total_steps=3", "checkpoint_every=3", "eval_examples=8", "eval_batch_size=8",
                "max_new_tokens=3", "data.max_patches_per_row=128", "vision_pretrain.steps=2",
                "vision_pretrain.batch_size=8", "vision_pretrain.eval_images=8",
                'optim.trainable=[("vision/.*", "frozen"), (".*", "train")]']


def _launch(script: str, workdir: str, monkeypatch) -> None:
    argv = [script, "--config", os.path.join(ROOT, "configs/demo_navit.py"), "--workdir", workdir]
    monkeypatch.setattr(sys, "argv", argv + [f"--config.{o}" for o in SMALL])
    runpy.run_path(os.path.join(ROOT, "launch", script), run_name="__main__")


def test_demo_navit_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    _launch("train.py", workdir, monkeypatch)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and np.isfinite(losses).all()
    with open(os.path.join(workdir, "vision_pretrain", "eval.json")) as f:
        assert set(json.load(f)) == {"step", "shape_accuracy", "color_accuracy", "quadrant_accuracy"}
    capsys.readouterr()
    _launch("eval.py", workdir, monkeypatch)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert sum(result["count_by_type"].values()) == 8
    with open(os.path.join(workdir, "eval_predictions.jsonl")) as f:
        assert len(f.readlines()) == 8
