"""Preemption (vlm_jax/train/preemption.py): SIGTERM and SIGINT make train() finish the step under way, checkpoint
there, say so and return; rerunning resumes to the same final state as a run never stopped. A second signal while
the checkpoint is written is absorbed, and the handlers from before are back once train() returns."""

import json
import os
import signal
import threading

from tests.helpers import assert_bitwise_equal, tiny_config
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.train import loop
from vlm_jax.train.preemption import StopSignals


def test_a_signal_only_records_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignals() as signals:
            assert not signals.agreed()
            os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt under the default handler
            assert signals.received == signal.SIGINT and signals.agreed()
            raise RuntimeError("a failing run")
    except RuntimeError:
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals._record
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_outside_the_main_thread_the_process_handlers_stay():
    before, seen = signal.getsignal(signal.SIGTERM), []

    def enter():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before]


def test_sigterm_checkpoints_the_step_and_resuming_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    config = tiny_config("total_steps=5")  # no periodic checkpoint before the end
    straight = loop.train(config, str(tmp_path / "straight"))
    workdir = str(tmp_path / "preempted")
    sent = []

    class PreemptedAfterStep2(loop.MetricsLogger):
        def advance(self, n: int = 1) -> None:
            super().advance(n)
            if self.bar.n == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    save = Checkpointer.save

    def save_then_signal(self, *args):  # a second signal while the (asynchronous) save is under way
        done = save(self, *args)
        os.kill(os.getpid(), signal.SIGINT)
        sent.append(args[0])
        return done

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with monkeypatch.context() as m:
        m.setattr(loop, "MetricsLogger", PreemptedAfterStep2)
        m.setattr(Checkpointer, "save", save_then_signal)
        loop.train(config, workdir)
    assert sent == [2]
    assert "preempted at step 2; checkpoint written; rerun the same command to resume" in capsys.readouterr().out
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
    resumed = loop.train(config, workdir)
    assert "preempted" not in capsys.readouterr().out
    assert_bitwise_equal(straight, resumed)
