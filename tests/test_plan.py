"""Ahead-of-time planning (launch/plan.py, vlm_jax/train/plan.py): the step compiles for a TPU topology through
libtpu and for the CPU devices, reports memory that moves with the work, counts model FLOPs by the documented
rule (vlm_jax/train/flops.py), and refuses a bad topology or a mesh the chips do not divide in one line; the
devices' peak FLOP/s, which MFU divides by, follow the compute dtype and count each chip once."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import ROOT, tiny_config
from vlm_jax import parallel
from vlm_jax.train.flops import CHIPS, measured_gemm_flops, model_flops, peak_flops, step_s_at_peak
from vlm_jax.train.loop import Setup
from vlm_jax.train.plan import plan


def test_plans_a_tpu_slice_without_a_tpu():
    report = plan(tiny_config(), parallel.topology_devices("v5e:2x2"))
    assert report["chip_kind"] == "TPU v5 lite" and report["chips"] == 4
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["hbm_bytes_per_chip"] == CHIPS["TPU v5 lite"].hbm_bytes and report["fits"] is True
    assert report["tokens_per_step"] == 8 * 128
    assert 0 < report["argument_bytes_per_chip"] < report["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"]


def test_memory_follows_the_rows_each_chip_holds():
    devices, one_layer = parallel.topology_devices("cpu:8"), ("model.text.layers=1", "model.vision.depth=1")
    small = plan(tiny_config("batch_size=8", *one_layer), devices)
    large = plan(tiny_config("batch_size=64", *one_layer), devices)
    fsdp = plan(tiny_config("batch_size=8", "mesh.data=1", "mesh.fsdp=-1", *one_layer), devices)
    assert small["hbm_bytes_per_chip"] is None and small["fits"] is None  # a CPU has no HBM to fit
    assert large["temp_bytes_per_chip"] > 4 * small["temp_bytes_per_chip"]
    # FSDP: each chip holds an eighth of the parameters and their Adam state.
    assert fsdp["argument_bytes_per_chip"] < 0.5 * small["argument_bytes_per_chip"]


def _component_params(setup) -> dict[str, int]:
    out = {"vision": 0, "connector": 0, "decoder": 0}
    for path, leaf in traverse_util.flatten_dict(setup.abstract_params).items():
        if path[:2] != ("decoder", "embed_tokens"):
            out[path[0]] += math.prod(leaf.shape)
    return out


def test_model_flops_count_what_trains_and_what_gradients_flow_through():
    everything = tiny_config()
    projector = tiny_config('optim.trainable=[("connector/.*", "train"), (".*", "frozen")]')
    n = _component_params(Setup(everything, parallel.topology_devices("cpu:1")))
    c, d, v = everything.model.connector, everything.data, everything.model.vision
    assert c.merge_size == 1
    tiles = everything.batch_size * d.max_tiles_per_row
    per_tile = (v.image_size // v.patch_size) ** 2 + 1  # the class token
    vision_tokens, text_tokens = tiles * per_tile, everything.batch_size * d.seq_len
    vision_attention = 4.0 * per_tile ** 2 * v.width * v.depth * tiles
    # Trained: 6 per parameter and token. Projector only: the tower runs forward alone (2), the frozen LLM passes
    # the gradient back to the projector (4), the projector trains (6).
    want = 4 * n["vision"] * vision_tokens + 2 * vision_attention + 2 * n["decoder"] * text_tokens
    got = (model_flops(everything, Setup(everything, parallel.topology_devices("cpu:1")))
           - model_flops(projector, Setup(projector, parallel.topology_devices("cpu:1"))))
    assert got == pytest.approx(want, rel=1e-12)


def test_bad_topology_and_mesh_are_one_line():
    for name, words in (("v9z:2x2", "v9z:2x2"), ("cpu:64", "xla_force_host_platform_device_count=64"),
                        ("bogus", "expected cpu:N")):
        with pytest.raises(ValueError, match=words):
            parallel.topology_devices(name)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        plan(tiny_config("mesh.fsdp=3"), parallel.topology_devices("cpu:8"))


def test_plan_command_prints_one_json_line():
    run = subprocess.run([sys.executable, "launch/plan.py", "--config", "configs/demo.py", "--topology", "cpu:2",
                          "--config.model.text.layers=1", "--config.model.vision.depth=1"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip())
    assert report["config"] == "configs/demo.py" and report["topology"] == "cpu:2" and report["chips"] == 2
    bad = subprocess.run([sys.executable, "launch/plan.py", "--config", "configs/demo.py", "--topology", "cpu:2",
                          "--config.mesh.fsdp=4"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("plan.py: mesh")


def test_a_step_refused_for_want_of_hbm_reports_what_it_needs():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from vlm_jax.train.plan import refused_memory

    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    args = [jax.ShapeDtypeStruct((1024, 256), np.float32, sharding=NamedSharding(mesh, P("fsdp"))),
            jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(mesh, P()))]
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (15.95G) exceeds available HBM (15.75G).")
    used = refused_memory(error, args)
    assert used["temp_bytes_per_chip"] == int(15.95 * 2 ** 30)
    assert used["argument_bytes_per_chip"] == 1024 * 256 * 4 // 4 + 8 * 4
    assert used["peak_bytes_per_chip"] == used["argument_bytes_per_chip"] + used["temp_bytes_per_chip"]
    assert refused_memory(RuntimeError("INVALID_ARGUMENT: something else"), args) is None


def _devices(kind: str, platform: str = "gpu", cores: tuple[int, ...] = (0,), chips: int = 4) -> list:
    return [SimpleNamespace(platform=platform, device_kind=kind, process_index=0, core_on_chip=core)
            for _ in range(chips) for core in cores]


def test_peak_flops_take_the_compute_dtype_and_count_each_chip_once():
    # float32 at JAX's default precision runs on an NVIDIA GPU's TF32 tensor cores, on a TPU as one bf16 pass.
    assert peak_flops(_devices("NVIDIA H100 80GB HBM3"), "float32") == 4 * 494.7e12
    assert peak_flops(_devices("NVIDIA H100 80GB HBM3"), "bfloat16") == 4 * 989.4e12
    assert peak_flops(_devices("TPU v5 lite", "tpu"), "float32") == 4 * 197e12
    # A TPU v4 listed a device per TensorCore is 4 chips, not 8.
    assert peak_flops(_devices("TPU v4", "tpu", cores=(0, 1)), "bfloat16") == 4 * 275e12
    assert peak_flops(_devices("NVIDIA Z9"), "bfloat16") is None


def test_an_unlisted_accelerator_logs_no_mfu_and_says_why(caplog):
    setup = SimpleNamespace(mesh=SimpleNamespace(devices=np.array(_devices("NVIDIA Z9"))),
                            config=tiny_config("model.dtype=bfloat16"))
    assert step_s_at_peak(setup) is None
    assert "MFU is not logged: device kind 'NVIDIA Z9' has no peak FLOP/s" in caplog.text


def test_a_cpu_peak_is_its_hosts_measured_gemm_not_one_a_device():
    cpu = jax.devices()[:2]  # two devices of one process share one host's cores
    assert peak_flops(cpu, "float32") == measured_gemm_flops("float32", cpu[0]) > 1e8
