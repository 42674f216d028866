"""A reused workdir (vlm_jax/train/resume.py): resuming under a config that differs from the saved one in a key that
changes what the run computes is one error listing each key, before anything in the workdir is written;
`allow_changes` accepts the differences a user means, unless they change the saved state's tree or shapes. A corrupt
checkpoint, a corrupt or refused import source and non-finite values in an import or in init_params are each one
error naming the file (and tensor)."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs.base import get_config
from tests.helpers import ROOT, TINY, tiny_config
from vlm_jax import parallel
from vlm_jax.checkpoints.params_only import save_params
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.cli import train as train_cli
from vlm_jax.errors import InputError
from vlm_jax.interop.hf_import import import_checkpoint
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.interop.torch_files import TorchFiles
from vlm_jax.train import loop

# Three steps planned, two run (checkpoints 1 and 2), with the vision tower frozen.
RUN = ["total_steps=3", "checkpoint_every=1", 'optim.trainable=[("vision/.*", "frozen"), (".*", "train")]']


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("run") / "w")
    loop.train(tiny_config(*RUN), path, stop_at=2)
    return path


def copy_of(workdir: str, tmp_path) -> str:
    dst = str(tmp_path / "w")
    shutil.copytree(workdir, dst)
    return dst


def snapshot(root: str) -> dict[str, tuple]:
    """Every file and folder under `root` with its mtime (and a file's bytes)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            data = open(path, "rb").read() if name in files else None
            out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns, data
    return out


STRUCTURE = "no allow_changes can resume it; start a new workdir from this one with --config.init_params="
CHANGES = {  # override -> what the error says of it; the first leaf of the state it cannot take, if any
    "model.text.layers=3": ("model.text.layers: 2 saved, 3 given",
                            "(['params']['decoder']['layers']['attn']['k_proj']['kernel']: saved (2, 64, 2, 32), "
                            "given (3, 64, 2, 32); "),
    'optim.trainable=[(".*", "train")]': (
        "optim.trainable: [['vision/.*', 'frozen'], ['.*', 'train']] saved, [['.*', 'train']] given",
        "(['opt_state'][2].inner_states['train'].inner_state[0].mu['vision']['layers']['attn']['k_proj']['bias']: "
        "saved none, given (2, 4, 16); "),
    "batch_size=16": ("batch_size: 8 saved, 16 given", None),
    "optim.lr=0.002": ("optim.lr: 0.001 saved, 0.002 given", None),
    "seed=1": ("seed: 0 saved, 1 given", None),
    "total_steps=6": ("total_steps: 3 saved, 6 given", None),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_config_is_refused_before_anything_is_written(workdir, change):
    said, leaf = CHANGES[change]
    before = snapshot(workdir)
    with pytest.raises(InputError) as e:
        loop.train(tiny_config(*RUN, change, "log_every=2", "data.threads=1", "mesh.fsdp=2"), workdir)  # free keys
    msg = str(e.value)
    assert msg.startswith(f"cannot resume {workdir} from step 2: the config differs from the one it saved in {said}")
    if leaf:
        assert f", which changes the saved state's parameters or optimizer state {leaf}" in msg
        assert f"{STRUCTURE}{workdir}@2 (its parameters, a fresh optimizer)" in msg
    else:
        assert STRUCTURE not in msg and msg.endswith(f"; to go on under the given values, add "
                                                     f"--config.allow_changes={change.split('=')[0]}")
    assert snapshot(workdir) == before


def test_every_differing_key_is_listed_in_one_error(workdir):
    with pytest.raises(InputError, match=r"in optim.lr: 0.001 saved, 0.002 given; seed: 0 saved, 1 given; to go on "
                                         r"under the given values, add --config.allow_changes=optim.lr,seed$"):
        loop.train(tiny_config(*RUN, "optim.lr=0.002", "seed=1", "allow_changes=optim.b1"), workdir)
    with pytest.raises(InputError, match=rf"model.text.layers: 2 saved, 3 given, which .* {STRUCTURE}{workdir}@2 "):
        loop.train(tiny_config(*RUN, "model.text.layers=3", "allow_changes=model"), workdir)  # allowed: still not
    with pytest.raises(InputError, match=r"allow_changes names 'optim.lrr', which is no config key or section"):
        loop.train(tiny_config(*RUN, "allow_changes=optim.lrr"), workdir)


def test_allowed_changes_are_logged_and_the_run_goes_on_under_them(workdir, tmp_path, caplog):
    w = copy_of(workdir, tmp_path)
    caplog.set_level(logging.INFO)
    state = loop.train(tiny_config(*RUN, "optim.lr=0.002", "total_steps=4", "allow_changes=optim,total_steps"), w)
    assert int(state.step) == 4
    assert "allow_changes: optim.lr: 0.001 saved, 0.002 given" in caplog.text
    assert "allow_changes: total_steps: 3 saved, 4 given" in caplog.text
    ckpt = Checkpointer(w, 2)
    saved = ckpt.read_config(4)
    ckpt.close()
    assert (saved.optim.lr, saved.total_steps) == (0.002, 4)  # the checkpoints save the values the run went on with


def test_the_command_prints_one_line_and_no_traceback(workdir, capsys):
    argv = ["--config", os.path.join(ROOT, "configs/demo.py"), "--workdir", workdir,
            *(f"--config.{o}" for o in TINY + RUN), "--config.seed=1"]
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith(f"error: cannot resume {workdir} from step 2: the config differs from the one it saved in "
                        "seed: 0 saved, 1 given; to go on under the given values, add --config.allow_changes=seed\n")


def test_a_truncated_checkpoint_file_names_the_checkpoint_and_the_one_before(workdir, tmp_path):
    w = copy_of(workdir, tmp_path)
    folder = os.path.join(w, "checkpoints", "2", "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    before = snapshot(w)
    # The command exits with the one error line: no traceback, and no orbax thread failing at exit after it.
    run = subprocess.run([sys.executable, "-m", "vlm_jax.cli.train", "--config", os.path.join(ROOT, "configs/demo.py"),
                          "--workdir", w, *(f"--config.{o}" for o in TINY + RUN)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "Event loop" not in run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith(f"error: checkpoint 2 in {w}/checkpoints is corrupt (OUT_OF_RANGE: Error reading ")
    assert last.endswith(f"delete {w}/checkpoints/2 to resume from step 1 (earlier checkpoints: [1])")
    assert snapshot(w) == before


def test_unreadable_checkpoint_metadata_names_the_checkpoint(workdir, tmp_path):
    w = copy_of(workdir, tmp_path)
    with open(os.path.join(w, "checkpoints", "2", "state", "_METADATA"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(InputError, match=rf"checkpoint 2 in {w}/checkpoints is corrupt \(its state's tree metadata "
                                         rf"cannot be read: .*\); delete {w}/checkpoints/2 to resume from step 1"):
        loop.train(tiny_config(*RUN), w)


def test_non_finite_init_params_name_the_checkpoint_and_tensor(tmp_path):
    config = tiny_config("total_steps=1", f"init_params={tmp_path / 'ckpt'}")
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), loop.Setup(config).abstract_params)
    params["connector"]["mlp"]["fc1"]["bias"][3] = np.nan
    save_params(str(tmp_path / "ckpt" / "params"), params)
    with pytest.raises(InputError, match=rf"params checkpoint {tmp_path}/ckpt/params holds non-finite values \(NaN "
                                         r"or Inf\) in 1 tensor\(s\): connector/mlp/fc1/bias$"):
        loop.train(config, str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == ["checkpoints"] and not os.listdir(tmp_path / "w" / "checkpoints")


class Opaque:  # an object torch.load(weights_only=True) will not build
    pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8))
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    return path


def test_an_import_source_with_a_nan_names_file_and_tensor(llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    file = str(src / "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, file, metadata={"format": "pt"})
    mesh = parallel.make_mesh(get_config().mesh)
    with pytest.raises(ConversionError, match=rf"^{file}: tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite "
                                              r"values \(NaN or Inf\)$"):
        import_checkpoint(str(src), str(tmp_path / "dst"), get_config().model, mesh)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_corrupt_or_refused_weight_file_is_named(llama, tmp_path):
    data = open(os.path.join(llama, "model.safetensors"), "rb").read()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match=rf"^{tmp_path}/cut/model.safetensors: not a readable safetensors file "
                                              r"\(Error while deserializing header: .*\)$"):
        TorchFiles(str(tmp_path / "cut"))

    torch.save({"w": torch.ones(2), "extra": Opaque()}, tmp_path / "pickled.bin")
    with pytest.raises(ConversionError, match=rf"^{tmp_path}/pickled.bin: torch.load\(weights_only=True\) refuses it "
                                              r"\(Unsupported global: GLOBAL .*Opaque was not an allowed global by "
                                              r"default\); if the file is trusted, load it with weights_only=False"):
        TorchFiles(str(tmp_path / "pickled.bin"))
    torch.save({"w": torch.ones(2)}, tmp_path / "whole.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:100])
    with pytest.raises(ConversionError, match=rf"^{tmp_path}/cut.bin: not a readable PyTorch checkpoint "
                                              r"\(PytorchStreamReader failed reading zip archive"):
        TorchFiles(str(tmp_path / "cut.bin"))
