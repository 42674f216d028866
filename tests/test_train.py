import gzip
import json
import os
import struct
import time

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from vlm_jax import parallel
from vlm_jax.train import loop
from vlm_jax.train.param_groups import label_params
from vlm_jax.train.step import make_train_step, split_micro_batches
from tests.helpers import assert_bitwise_equal, first_batch, tiny_config


FREEZE_VISION = "optim.trainable=[('vision/.*', 'frozen'), ('.*', 'train')]"
NO_WARMUP = "optim.warmup_steps=0"


def read_scalars(path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TensorBoard event file: records of a length, its masked CRC32C, an
    Event proto and its masked CRC32C, every CRC checked."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        record = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header), f"{path}: byte {pos}"
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(record), pos
        event = event_pb2.Event.FromString(record)
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        pos += 16 + length
    return out


def one_step(config, devices, micro_batches=1):
    setup = loop.Setup(config, devices)
    state = setup.fresh_state()
    before = jax.device_get(state.params)
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings,
                           micro_batches=micro_batches)
    new_state, metrics = step(state, parallel.global_batch(first_batch(config), setup.mesh))
    return metrics, before, jax.device_get(new_state.params), new_state


def test_one_step_same_on_1_and_8_devices_with_frozen_vision():
    assert jax.device_count() == 8
    # Plain SGD: the update is linear in the gradient, so the summation order of 8 devices moves parameters by
    # lr times rounding noise. (Adam's first step is about lr * sign(grad) and flips wherever a gradient is at
    # noise level, which made any tolerance depend on the batch.)
    common = (FREEZE_VISION, NO_WARMUP, "optim.optimizer=sgd")
    config = tiny_config("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", *common)
    m1, before, params1, _ = one_step(tiny_config("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", *common),
                                      jax.devices()[:1])
    m8, _, params8, state8 = one_step(config, None)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=1e-5)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params1, params8)
    assert max(jax.tree.leaves(diffs)) < 1e-4 * config.optim.lr
    # The frozen tower is untouched and has no optimizer state; everything else moved.
    jax.tree.map(np.testing.assert_array_equal, before["vision"], params8["vision"])
    assert "vision" not in state8.trainable and "vision" in state8.frozen
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["decoder"], params8["decoder"])
    assert all(jax.tree.leaves(moved))
    # fsdp x tensor really shards: some parameter is split over several devices.
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state8.trainable))


def test_micro_batches_give_the_one_pass_loss_and_update():
    """Gradient accumulation over 2 micro-batches of 8 rows on the 8-device mesh (fsdp x tensor) matches one pass
    over all 16: the loss is the token-weighted mean over the whole batch, however the tokens fall."""
    config = tiny_config("batch_size=16", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", FREEZE_VISION, NO_WARMUP,
                         "optim.optimizer=sgd")
    m1, before, params1, _ = one_step(config, None)
    m2, _, params2, _ = one_step(config, None, micro_batches=2)
    for key in ("loss", "grad_norm", "loss_tokens"):
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before["decoder"], params1["decoder"])
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params1, params2)
    assert max(jax.tree.leaves(diffs)) < 1e-4 * config.optim.lr < min(jax.tree.leaves(moved))


def test_micro_batches_shrink_the_compiled_step_memory():
    config = tiny_config("batch_size=16", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    setup = loop.Setup(config, jax.devices()[:1])
    state, batch = setup.fresh_state(), parallel.global_batch(first_batch(config), setup.mesh)

    def temp_bytes(n):
        step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, micro_batches=n)
        with jax.set_mesh(setup.mesh):
            return step.jitted.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    one, four = temp_bytes(1), temp_bytes(4)
    assert four < 0.6 * one, (one, four)


def test_micro_batch_i_takes_every_nth_row_from_every_device():
    mesh = loop.Setup(tiny_config(), None).mesh
    rows = np.arange(16 * 3).reshape(16, 3)
    batch = parallel.global_batch({"x": rows}, mesh)
    split = jax.jit(lambda b: split_micro_batches(b, 2, mesh))(batch)["x"]
    np.testing.assert_array_equal(np.asarray(split), np.stack([rows[0::2], rows[1::2]]))
    # Each device keeps its rows (2k, 2k + 1 -> column k of both micro-batches): no data moves, and each
    # micro-batch spans all 8 devices.
    before = {s.device: s.index[0].start for s in batch["x"].addressable_shards}
    after = {s.device: s.index for s in split.addressable_shards}
    assert len(after) == 8 and all(index[0] == slice(None) and index[1] == slice(before[d] // 2, before[d] // 2 + 1)
                                   for d, index in after.items())


def test_micro_batches_must_split_the_batch_over_the_mesh():
    mesh = loop.Setup(tiny_config(), None).mesh
    with pytest.raises(ValueError, match="micro_batches=3"):
        loop.check_batch_size(tiny_config("micro_batches=3"), mesh)
    with pytest.raises(ValueError, match="micro_batches=2"):  # 8 rows = 2 x 4: not a multiple of 8 devices
        loop.check_batch_size(tiny_config("micro_batches=2"), mesh)


def test_resume_matches_uninterrupted_run(tmp_path, capsys):
    full = tiny_config("total_steps=6", "checkpoint_every=3")
    state_full = loop.train(full, str(tmp_path / "full"), profile_steps=(2, 3))
    loop.train(full, str(tmp_path / "resumed"), stop_at=3)
    assert "stopped (stop_at) at step 3; checkpoint written" in capsys.readouterr().out
    state_resumed = loop.train(full, str(tmp_path / "resumed"), profile_steps=(2, 3))  # past step 3: no trace
    assert not (tmp_path / "resumed" / "profile").exists()
    assert_bitwise_equal(state_full, state_resumed)  # parameters, optimizer state and step
    losses = [[json.loads(l)["loss"] for l in open(tmp_path / w / "metrics.jsonl")]
              for w in ("full", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    (events,) = (tmp_path / "full" / "tensorboard").iterdir()
    tb_losses = [v for _, tag, v in read_scalars(events) if tag == "loss"]
    np.testing.assert_allclose(tb_losses, losses[0], rtol=1e-6)
    # The resumed run's writer adds to the interrupted one's events (the same process, maybe the same second).
    resumed = sorted((step, v) for events in (tmp_path / "resumed" / "tensorboard").iterdir()
                     for step, tag, v in read_scalars(events) if tag == "loss")
    assert [step for step, _ in resumed] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in resumed], losses[1], rtol=1e-6)
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0
    (table,) = json.load(open(tmp_path / "full" / "param_groups.json"))
    assert table["group"] == "train" and table["params"] > 0 and table["lr"] == full.optim.lr
    # The speed of every logged step: MFU against this CPU's measured GEMM peak, the step time and its share
    # blocked on the data iterator, in metrics.jsonl and TensorBoard alike.
    for record in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")):
        assert 0 < record["mfu"] < 1 and record["time/step_s"] > 0
        assert 0 <= record["time/data_wait_fraction"] <= 1
    assert {"mfu", "time/step_s", "time/data_wait_fraction"} <= {tag for _, tag, _ in read_scalars(events)}
    (session,) = (tmp_path / "full" / "profile" / "plugins" / "profile").iterdir()
    with gzip.open(session / "perfetto_trace.json.gz") as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any(n.startswith("PjitFunction(") for n in names)  # the jitted steps it dispatched
    assert any(n.endswith(".xplane.pb") for n in os.listdir(session))  # what TensorBoard's profile tab reads


def test_the_logged_step_time_splits_into_waiting_for_data_and_the_rest(tmp_path):
    def slow_batches():
        while True:
            time.sleep(0.2)  # a producer that cannot keep up
            yield {}

    logger = loop.MetricsLogger(str(tmp_path), 0, 4, step_s_at_peak=0.01)
    data = slow_batches()
    logger.next_batch(data)
    waited = logger.log(1, {"loss": 1.0}, tokens=10)
    ran = logger.log(2, {"loss": 1.0}, tokens=20)  # this interval waited for nothing
    logger.close()
    assert 0.9 < waited["time/data_wait_fraction"] <= 1 and ran["time/data_wait_fraction"] == 0
    assert waited["time/step_s"] >= 0.2 and waited["mfu"] == pytest.approx(0.01 / waited["time/step_s"])


def test_unknown_config_key_is_named():
    with pytest.raises(KeyError, match="data has no 'seq_lenn'.*seq_len"):
        tiny_config("data.seq_lenn=5")


def test_label_rules_refuse_unmatched_parameter_and_unused_rule():
    params = {"vision": {"w": np.zeros(2)}, "decoder": {"w": np.zeros(2)}}
    with pytest.raises(ValueError, match="decoder/w"):
        label_params(params, [("vision/.*", "frozen")])
    with pytest.raises(ValueError, match="projector"):
        label_params(params, [("projector/.*", "frozen"), (".*", "train")])
    assert set(label_params(params, [("vision/.*", "frozen"), (".*", "train")]).values()) == {
        "frozen", "train"}


def test_frozen_parameters_stored_in_bf16_train_like_their_bf16_values():
    common = (FREEZE_VISION, NO_WARMUP)
    metrics, before, after, state = one_step(tiny_config("model.frozen_param_dtype=bfloat16", *common), None)
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {np.dtype("float32")}
    for a, b in zip(jax.tree.leaves(before["vision"]), jax.tree.leaves(after["vision"])):
        np.testing.assert_array_equal(a, b)
    # The same step from fp32 frozen weights that hold the same (bf16-rounded) values: the same loss.
    config = tiny_config(*common)
    setup = loop.Setup(config)
    rounded = jax.tree.map(lambda x: x.astype("bfloat16").astype("float32"), setup.fresh_state().frozen)
    fp32 = setup.fresh_state().replace(frozen=jax.device_put(rounded, setup.state_shardings.frozen))
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
    _, want = step(fp32, parallel.global_batch(first_batch(config), setup.mesh))
    np.testing.assert_allclose(float(metrics["loss"]), float(want["loss"]), rtol=1e-6)


def test_bf16_compute_trains_fp32_master_weights_from_bf16_gradients():
    metrics, before, after, state = one_step(tiny_config("model.dtype=bfloat16", FREEZE_VISION, NO_WARMUP), None)
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {np.dtype("float32")}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["decoder"]),
                                                        jax.tree.leaves(after["decoder"]))]
    assert all(moved)  # Adam's first step moves every parameter of a trained group
