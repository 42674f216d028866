"""Bad config values stop a command up front with one error naming the key (vlm_jax/config.py check_values); a torn
last line of metrics.jsonl does not stop a resume; the launchers' INFO lines reach stderr."""

import json
import os
import subprocess
import sys

import jax
import pytest

from vlm_jax.cli.args import parse
from vlm_jax.config import check_values, load_config
from vlm_jax.train.loop import train
from vlm_jax.train.metrics import MetricsLogger
from vlm_jax.train.plan import plan
from tests.helpers import ROOT, tiny_config
from tests.test_config import CONFIGS

DEMO = os.path.join(ROOT, "configs/demo.py")


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_passes(path):
    check_values(load_config(os.path.join(ROOT, path)))


@pytest.mark.parametrize("override, named", [
    ("batch_size=0", "batch_size=0 must be at least 1"),
    ("data.seq_len=-1", "data.seq_len=-1 must be at least 1"),
    ("model.text.layers=0", "model.text.layers=0 must be at least 1"),
    ("micro_batches=0", "micro_batches=0 must be at least 1"),
    ("total_steps=-5", "total_steps=-5 must be 0 or more"),
    ("checkpoint_every=-1", "checkpoint_every=-1 must be 0 or more"),
    ("total_steps=0", "total_steps=0 trains nothing"),
    ("optim.schedule=cosin", "optim.schedule='cosin' is not one of 'cosine', 'linear', 'constant'"),
    ("optim.optimizer=adam", "optim.optimizer='adam' is not one of 'adamw', 'sgd'"),
    ("model.attention=flash", "model.attention='flash' is not one of 'auto', 'xla', 'cudnn', 'splash'"),
    ("model.remat_policy=dot", "model.remat_policy='dot' is not one of"),
    ("model.vision.stem=vit", "model.vision.stem='vit' is not one of"),
    ("model.connector.kind=linear", "model.connector.kind='linear' is not one of"),
    ("data.source=json", "data.source='json' is not one of 'synthetic', 'llava_json'"),
    ("data.template=vicuna", "data.template='vicuna' is not one of"),
    ("model.text.rope_kind=2d", "model.text.rope_kind='2d' is not one of '1d', 'mrope'"),
])
def test_a_bad_value_is_one_error_naming_the_key(override, named, tmp_path, capsys):
    with pytest.raises(ValueError, match="config key " + named.replace("(", r"\(")):
        check_values(tiny_config(override))
    # The command line: one usage error line, before any workdir is made.
    with pytest.raises(SystemExit):
        parse("vlm-train", ["--config", DEMO, "--workdir", str(tmp_path / "w"), f"--config.{override}"])
    assert named in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_epochs_count_the_steps_when_total_steps_is_0():
    check_values(tiny_config("total_steps=0", "data.epochs=1"))


def test_train_and_plan_check_first(tmp_path):
    with pytest.raises(ValueError, match="config key batch_size=0 must be at least 1"):
        train(tiny_config("batch_size=0"), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="config key total_steps=-5 must be 0 or more"):
        plan(tiny_config("total_steps=-5"), jax.devices())


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    MetricsLogger(str(tmp_path), 2, 10).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert "torn last line" in caplog.text
    # Anywhere else a line that is not JSON is damage a crash does not make: an error naming file and line.
    (tmp_path / "metrics.jsonl").write_text(lines[0] + '{"step": 2, "lo\n' + lines[2])
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        MetricsLogger(str(tmp_path), 2, 10)


def test_the_trainers_info_lines_reach_stderr(tmp_path):
    # The train command's imports (orbax logs through absl at import, which configures the root logger first).
    code = ("import logging, sys; from vlm_jax.cli import train; from vlm_jax.cli.args import parse; "
            "parse('vlm-train', sys.argv[1:]); logging.info('resumed from step %d', 7)")
    run = subprocess.run([sys.executable, "-c", code, "--config", DEMO, "--workdir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    assert "INFO resumed from step 7" in run.stderr
