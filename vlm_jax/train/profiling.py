"""`vlm-train --profile_steps A:B`: a jax profiler trace of training steps A to B, for TensorBoard's profile tab
(the `.xplane.pb`) and ui.perfetto.dev (`perfetto_trace.json.gz`)."""

import logging
import os

import jax

log = logging.getLogger(__name__)


class StepTrace:
    """Traces the steps `steps` = (A, B) of a run that resumes after step `start`: the trace starts once the device
    work before step A is done (so it holds nothing earlier) and stops once step B's is. A run resumed after step A
    traces from its first step (its compilation included), one resumed at B or later traces nothing, and one that
    stops before B (stop_at, a preemption, an error) writes what it traced.

    Every process traces its own host's devices and work into WORKDIR/profile (WORKDIR/profile/process_<i> with
    several processes, so that neither takes the other's session folder for its own): a slow host shows in its
    own trace. `tensorboard --logdir WORKDIR` shows them beside the scalars."""

    def __init__(self, steps: tuple[int, int] | None, workdir: str, start: int):
        first, last = steps or (0, 0)
        self.first, self.last = (max(first, start + 1), last) if last > start else (None, None)
        self.folder = os.path.join(workdir, "profile")
        if jax.process_count() > 1:
            self.folder = os.path.join(self.folder, f"process_{jax.process_index()}")
        self.tracing, self.traced = False, None  # the last step traced

    def before(self, step: int, state) -> None:
        """Called before step `step`'s batch is fetched; `state` is the train state the step starts from."""
        if step == self.first:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int, outputs) -> None:
        """Called once step `step` is dispatched; `outputs` are its results (the new state, its metrics)."""
        if self.tracing:
            self.traced = step
        if step == self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace under way and writes it."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            log.info("profiled steps %d to %s into %s (TensorBoard's profile tab; perfetto_trace.json.gz opens in "
                     "ui.perfetto.dev)", self.first, self.traced, self.folder)
