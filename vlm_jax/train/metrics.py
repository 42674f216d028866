"""Training outputs: JSON-lines metrics, TensorBoard scalars, a progress bar, the loss-curve PNG."""

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import TypeVar

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from vlm_jax.files import replace_file

log = logging.getLogger(__name__)
T = TypeVar("T")


class MetricsLogger:
    """One JSON object per logged step in WORKDIR/metrics.jsonl (appended across resumes). Of several processes
    only process 0 writes the file, the TensorBoard events and the progress bar; every process's `log` returns
    the record (the metrics are the same global values in each)."""

    def __init__(self, workdir: str, start_step: int, total_steps: int, step_s_at_peak: float | None = None):
        """`step_s_at_peak`: the seconds a step takes at the devices' peak FLOP/s (train/flops.py), from which
        each logged line's `mfu` comes; None logs no `mfu`."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writes = jax.process_index() == 0
        if self.writes:
            self._trim_after(start_step)
        # tensorboardX names a file by the second and host and overwrites it: a run resumed within the same second
        # would erase the events before its checkpoint, so the name also says which process started at which step.
        # A live TensorBoard sees logged steps within seconds (tensorboardX's default waits two minutes).
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=5,
                                filename_suffix=f".{os.getpid()}.{start_step}") if self.writes else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        mininterval=1.0, disable=not self.writes)
        self._last = (time.perf_counter(), start_step, 0.0)
        self.step_s_at_peak = step_s_at_peak
        self._waited: float | None = None  # seconds blocked in next_batch since the last log; None: never called

    def _trim_after(self, step: int) -> None:
        # A resumed run repeats the steps after its checkpoint; drop their stale lines first.
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path} line {i + 1} is not JSON ({e}); only the last line can be torn "
                                     "(by a crash while it was written)") from None
                # A crash mid-write tears only the last line, a step after the checkpoint resumed from.
                log.warning("%s: dropping its torn last line %r", self.path, line[:80])
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        replace_file(self.path, lambda f: f.writelines(kept))  # a kill while it is rewritten loses no line

    def next_batch(self, data: Iterator[T]) -> T:
        """next(data), the seconds it blocks counted in the next logged line's `time/data_wait_fraction`."""
        begin = time.perf_counter()
        try:
            return next(data)
        finally:
            self._waited = (self._waited or 0.0) + time.perf_counter() - begin

    def log(self, step: int, metrics: dict, tokens: float, paused: float = 0.0) -> dict:
        """Logs `metrics` of `step` with the rates over the wall time since the last log less `paused` seconds (an
        evaluation's): `tokens` (a running total) per second, steps per second and seconds per step, the share of
        that time blocked in next_batch, and MFU. Call it once the step's results are fetched from the devices, so
        that the time holds the device work dispatched asynchronously before it."""
        now = time.perf_counter()
        t0, s0, tok0 = self._last
        t0 += paused
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if now > t0:
            seconds = now - t0
            record["tokens_per_s"] = (tokens - tok0) / seconds
            record["steps_per_s"] = (step - s0) / seconds
            record["time/step_s"] = seconds / (step - s0)
            if self._waited is not None:
                record["time/data_wait_fraction"] = self._waited / seconds
            if self.step_s_at_peak is not None:
                record["mfu"] = self.step_s_at_peak / record["time/step_s"]
        self._last = (now, step, tokens)
        if self._waited is not None:
            self._waited = 0.0
        if not self.writes:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                             **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}), refresh=False)
        return record

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(workdir: str, out_png: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
