"""Preemption: SIGTERM and SIGINT (what a TPU or spot preemption and Ctrl-C send) ask the trainer to stop at the
next step boundary, where it writes a checkpoint and returns (docs/contracts.md, "Preemption")."""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM and SIGINT only record that they came (`received`); the handlers before are back on
    exit. Every further signal is absorbed the same way, so a second one cannot interrupt a checkpoint being
    written; only SIGKILL ends the process then (orbax commits a checkpoint by renaming its finished directory,
    so a torn one is never resumed from)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        # Python runs handlers in the main thread and lets only it install them; a train() called from another
        # thread keeps the process's handlers. A signal the process was started ignoring (SIGINT in a shell's
        # background job) stays ignored.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS
                              if signal.getsignal(s) != signal.SIG_IGN}
        return self

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python, which Python cannot reinstall.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def agreed(self) -> bool:
        """Whether any process has received a stop signal. With several processes this is a collective (a
        one-byte all-gather) that every process calls once a step, so all of them stop after the same step."""
        mine = self.received is not None
        if jax.process_count() == 1:
            return mine
        return bool(np.any(multihost_utils.process_allgather(np.array(mine))))
