"""Where the packer's examples come from: a shard's stream read in order, computed ahead by threads of the trainer
process or by grain worker processes (data.threads, data.workers; docs/contracts.md, "Workers")."""

import collections
import concurrent.futures
import dataclasses
import functools
import os
import signal
import threading
import time
import traceback

import grain
import numpy as np
from absl import flags

from vlm_jax.data.packing import Example, NavitExample
from vlm_jax.errors import ReportedError

class AheadReader:
    """Reads examples[index], examples[index + 1], ... in order, nothing at or past `stop`, computing them ahead in
    `workers` grain worker processes (_ProcessFeed) or, with 0, `lookahead` of them in `threads` threads of this
    process (_ThreadFeed), started at the first peek; counts the records the packer leaves out (`skipped`:
    SKIPPED), from `skipped` before `index`."""

    def __init__(self, examples: grain.MapDataset, index: int, stop: int | None = None,
                 skipped: tuple[int, int] = (0, 0), workers: int = 0, threads: int = 1, lookahead: int = 8):
        self.examples, self.index, self.stop = examples, index, stop
        self.bad, self.too_long = skipped
        self.workers, self.threads, self.lookahead = workers, threads, lookahead
        self._feed: _ThreadFeed | _ProcessFeed | None = None
        self._head: list = []  # the example at self.index once read

    def peek(self) -> Example | NavitExample:
        """The example at self.index (not consumed)."""
        if not self._head:
            if self._feed is None:
                self._feed = (_ProcessFeed(self.examples, self.index, self.stop, self.workers, self.lookahead)
                              if self.workers else
                              _ThreadFeed(self.examples, self.index, self.stop, self.threads, self.lookahead))
            self._head.append(next(self._feed))
        return self._head[0]

    def advance(self) -> None:
        self.peek()
        self._head.clear()
        self.index += 1

    def skipped(self) -> tuple[int, int]:
        return self.bad, self.too_long

    def cancel(self) -> None:
        """Stops the threads or worker processes (what they computed ahead is dropped)."""
        if self._feed is not None:
            self._feed.close()
            self._feed = None


class _ThreadFeed:
    """examples[start], examples[start + 1], ... up to `stop`, `lookahead` of them computed ahead by `threads`
    threads."""

    def __init__(self, examples: grain.MapDataset, start: int, stop: int | None, threads: int, lookahead: int):
        self.examples, self.next, self.stop, self.lookahead = examples, start, stop, lookahead
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="vlm_jax-data-read")
        self.pending: collections.deque = collections.deque()

    def __next__(self):
        while len(self.pending) < self.lookahead and (self.stop is None or self.next < self.stop):
            self.pending.append(self.pool.submit(self.examples.__getitem__, self.next))
            self.next += 1
        return self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DataWorkerError(RuntimeError):
    """An exception other than a ReportedError in a data worker process, with the worker's traceback: a bug."""


class _ReadInWorker:
    """Stream index -> examples[index] in a grain worker process, as (its class, its fields) so that grain passes
    the arrays through shared memory. An exception other than a ReportedError (which pickles as it is) comes back
    as a DataWorkerError naming the stream index, the exception and the worker's traceback."""

    def __init__(self, examples: grain.MapDataset):
        self.examples = examples

    def __call__(self, index: int) -> tuple[type, dict]:
        index = int(index)
        try:
            ex = self.examples[index]
        except ReportedError:
            raise
        except Exception as e:
            raise DataWorkerError(
                f"data worker process {os.getpid()} failed on example {index} of its data shard's stream: "
                f"{type(e).__name__}: {e}\nworker traceback:\n{''.join(traceback.format_exception(e))}") from None
        return type(ex), {f.name: getattr(ex, f.name) for f in dataclasses.fields(ex)}


def _own(value):
    """`value` with every array in grain's shared memory (an ndarray subclass; an empty array comes pickled, plain)
    copied out, which frees it: the examples the packer holds (a whole window) take neither shared memory nor a file
    descriptor each."""
    if isinstance(value, np.ndarray):
        return value if type(value) is np.ndarray else np.array(value)
    if isinstance(value, tuple):
        return tuple(_own(v) for v in value)
    return value


def _worker_init(trainer: int, index: int, count: int) -> None:
    """Runs first in every worker process. Ctrl-C and SIGTERM are the trainer's to act on (it ends after its step
    and closes its workers: a worker killed by them would fail that step's batch); a worker whose trainer is gone
    (killed outright) exits instead of waiting on its queue forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(trainer,), daemon=True, name="vlm_jax-worker-watch").start()


def _exit_without(trainer: int) -> None:
    while os.getppid() == trainer:
        time.sleep(1.0)
    os._exit(1)


_ENDLESS = 2 ** 62  # the stop of a stream without one: grain's range is lazy
# Every array comes back through shared memory, leaving the queue's pipe only small messages: a worker stopped
# with pipe-sized arrays still queued would wait on its queue's feeder thread until grain kills it (25 s).
_MIN_SHM_BYTES = 0


class _ProcessFeed:
    """examples[start], examples[start + 1], ... up to `stop`: grain worker k of `workers` computes examples
    start + k, start + k + workers, ... (its buffer holds `lookahead / workers` of them ahead), and grain's
    interleave reads them back in order. Workers are spawned processes (a second or two to start, each importing
    the data code and unpickling the stream: source, tokenizer, image processor); close() stops them and frees
    their shared memory, as grain does at exit for any left open."""

    def __init__(self, examples: grain.MapDataset, start: int, stop: int | None, workers: int, lookahead: int):
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags, which only an absl app has parsed
            flags.FLAGS.mark_as_parsed()
        stream = grain.MapDataset.range(start, _ENDLESS if stop is None else stop).map(_ReadInWorker(examples))
        stream = grain.experimental.WithOptionsIterDataset(
            stream.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
            grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES))
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, lookahead // workers))
        self._it = iter(stream.mp_prefetch(options, worker_init_fn=functools.partial(_worker_init, os.getpid())))

    def __next__(self):
        cls, fields = next(self._it)
        return cls(**{name: _own(value) for name, value in fields.items()})

    def close(self) -> None:
        self._it.close()
