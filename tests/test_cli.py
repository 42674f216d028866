"""The one command line every command shares (vlm_jax/cli/args.py): pyproject.toml's console commands and the
launch/ scripts run the same `main`, every command takes --config and its overrides, the commands that run on
devices take the multi-process flags and set up jax.distributed from them or from the environment, and the train
command runs the demo's stage 0 only for a config that asks for it."""

import os
import runpy
import sys
import tomllib
from importlib import import_module

import jax
import pytest

from tests.helpers import ROOT
from vlm_jax.cli import args, convert, soup, train

DEMO = os.path.join(ROOT, "configs/demo.py")
MULTI = ["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "1"]


def commands() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv + ["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_every_command_is_installed_and_launchable_with_the_shared_flags(capsys, monkeypatch):
    scripts = commands()
    assert set(scripts) >= {"vlm-train", "vlm-eval", "vlm-convert", "vlm-plan", "vlm-soup", "vlm-check-data",
                            "vlm-prepare-data"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(import_module(module), attr)
        command = name.removeprefix("vlm-").replace("-", "_")
        sub = ["import"] if command == "convert" else []
        monkeypatch.setattr(sys, "argv", [f"launch/{command}.py"])  # the program name the usage line shows
        text = help_text(main, sub, capsys)
        assert "--config" in text, name
        # plan compiles for devices it chooses itself: no jax.distributed before it has; check_data and
        # prepare_data use none.
        assert ("--coordinator_address" in text) == (command not in ("plan", "check_data", "prepare_data")), name
        # python launch/COMMAND.py runs the same main.
        monkeypatch.setattr(sys, "argv", [f"launch/{command}.py", *sub, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(os.path.join(ROOT, "launch", f"{command}.py"), run_name="__main__")
        assert done.value.code == 0 and capsys.readouterr().out == text, name


def test_soup_and_convert_take_the_config_mesh_and_the_multi_process_flags(monkeypatch, tmp_path):
    initialized, meshes = [], []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: initialized.append(a))
    monkeypatch.setattr(soup, "soup", lambda src, dst, mesh, weights: meshes.append(mesh) or {"soup": {}})
    monkeypatch.setattr(convert, "import_checkpoint", lambda src, dst, model, mesh, **kw: meshes.append(mesh))
    mesh = ["--config", DEMO, "--config.mesh.data=2", "--config.mesh.fsdp", "4"]
    soup.main(["--src", "a", "--src", "b", "--dst", str(tmp_path / "soup"), *mesh, *MULTI])
    convert.main(["import", "--src", str(tmp_path), "--dst", str(tmp_path / "ckpt"), *mesh, *MULTI])
    soup.main(["--src", "a", "--dst", str(tmp_path / "soup")])  # the base config's mesh, one process
    assert initialized == [("h:1", 2, 1)] * 2
    assert [dict(m.shape) for m in meshes] == [{"data": 2, "fsdp": 4, "tensor": 1}] * 2 + [
        {"data": 8, "fsdp": 1, "tensor": 1}]


def test_a_command_with_subcommands_takes_the_shared_flags_after_its_name(capsys):
    got, config = args.parse("t", ["export", "--src", "s", "--dst", "d", "--config", DEMO, "--config.seed=3"],
                             workdir=False, distributed=False, config_optional=True, commands=convert.COMMANDS)
    assert got.command == "export" and got.format == "hf" and got.config == DEMO and config.seed == 3
    with pytest.raises(SystemExit):
        args.parse("t", ["--src", "s"], workdir=False, distributed=False, commands=convert.COMMANDS)
    with pytest.raises(SystemExit):
        args.parse("t", ["check", "--src", "s", "--config.sed=3"], distributed=False, workdir=False,
                   config_optional=True, commands=convert.COMMANDS)
    assert "config key 'sed'" in capsys.readouterr().err


def test_the_train_command_runs_stage0_first_only_when_the_config_asks(monkeypatch):
    ran = []
    monkeypatch.setattr(train, "train", lambda config, workdir, stop_at, profile_steps: ran.append(
        ("train", workdir, stop_at, profile_steps)))
    monkeypatch.setattr(train, "train_demo", lambda config, workdir, stop_at, profile_steps: ran.append(
        ("train_demo", workdir, stop_at, profile_steps)))
    train.main(["--config", DEMO, "--workdir", "w", "--profile_steps", "2:3"])  # the demo pretrains its tower first
    train.main(["--config", DEMO, "--workdir", "v", "--config.vision_pretrain.steps=0", "--stop_at", "3"])
    assert ran == [("train_demo", "w", None, (2, 3)), ("train", "v", 3, None)]


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_stop_at_takes_a_step_number(value, capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", DEMO, "--workdir", "w", "--stop_at", value])
    assert f"--stop_at: {value!r} is not a step number" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["3:2", "0:2", "2", "2:", ":3", "a:b", "1:2:3"])
def test_profile_steps_takes_a_range_of_steps(value, capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", DEMO, "--workdir", "w", "--profile_steps", value])
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert line.endswith(f"--profile_steps: {value!r} is not a range of steps A:B with 1 <= A <= B")


def test_the_train_help_explains_stop_at(capsys):
    text = " ".join(help_text(train.main, [], capsys).split())  # argparse wraps lines anywhere
    assert "--stop_at N stop after step N with a checkpoint, as a preemption would" in text


SLURM = dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[001-004]", SLURM_NTASKS="4", SLURM_PROCID="2",
             SLURM_LOCALID="0")


@pytest.mark.parametrize("environ, want", [
    ({}, None),
    ({"PATH": "/bin", "HOSTNAME": "node001"}, None),
    (SLURM, "SLURM job 77 of 4 tasks"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # sbatch outside srun: jax finds none
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI job of 2 processes"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1", **SLURM}, None),  # jax's order
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "1"}, "TPU job of 1 slice(s), 4 host(s) each"),
    ({"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"}, None),
    ({"TPU_PROCESS_ADDRESSES": "a:1,b:1", "TPU_WORKER_HOSTNAMES": "t-0"}, "TPU job of 1 slice(s), 2 host(s) each"),
    ({"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_COORDINATOR_ADDRESS": "t-0"}, "TPU job of 2 slice(s), 1 host(s) each"),
])
def test_the_environment_decides_whether_to_initialize(environ, want):
    assert args.cluster_description(environ) == want


def test_a_cloud_tpu_vm_initializes_from_its_metadata_server():
    # jax asks the metadata server for the slice's hosts; a job described by its variables still decides first.
    assert args.cluster_description({}, tpu_vm=True) == "Cloud TPU VM (its hosts from the metadata server)"
    assert args.cluster_description(SLURM, tpu_vm=True) == "SLURM job 77 of 4 tasks"
    assert args.tpu_chips_here() == 0  # this test host has no TPU


def test_parse_initializes_a_described_job_and_refuses_half_flags(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
    argv = ["--config", os.path.join(ROOT, "configs/demo.py"), "--workdir", "w"]
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    args.parse("t", argv)
    args.parse("t", argv + ["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "1"])
    assert calls == [(), ("h:1", 2, 1)]  # flags win over the environment
    monkeypatch.setenv("SLURM_NTASKS", "four")
    with pytest.raises(SystemExit):
        args.parse("t", argv)
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(SystemExit):
        args.parse("t", argv + ["--num_processes", "2"])
    args.parse("t", argv)
    assert len(calls) == 2
