"""Data entry points for the trainer: packed training batches and tokenised evaluation prompts.

Record (source) -> example of the model's image-input kind (data/image_kinds.py: tiles, or native-resolution
patches) -> greedily packed rows of the batch contract in docs/contracts.md, laid out as the kind says.
The example stream is a grain MapDataset: shuffled, then cut into `data.shards` data shards (shard s holds
examples s, s + shards, ...). grain's MapDataset reads past its length into later epochs (and reseeds the shuffle
per epoch), so each shard's stream is infinite and its example i is a pure function of i. Each shard packs its own
rows of every batch, greedily or a window at a time, so a shard's state is the index of its next unpacked example
(and its window's progress); the batch is every shard's rows in shard order, whichever process builds which shard.
With data.epochs N > 0 the epochs are hard boundaries: no row, window or group holds examples of two epochs, and a
shard's stream ends after its N-th epoch (its rows of later batches stay empty), so the rows are what
data/epochs.py counts and a run of the steps it derives sees every example N times.

A mixture (data.mixture, docs/contracts.md) mixes several such streams: each source is shuffled with its own seed
(derived from config.seed and its name) and cut into the same data shards, and shard s of the mixture interleaves
the sources' shard-s streams by weight (`WeightedSchedule`), so its example i is again a pure function of i.

Who computes the examples (read, decode, preprocess, tokenise: `ReadExample`) is data.workers: N > 0 grain worker
processes per data shard, each computing every N-th example from the shard's stream position on (an interleave reads
them back in stream order), or with 0 a pool of data.threads threads of the trainer process. The packer runs in the
trainer process either way and its state is the stream position, so the batches are the same for any worker count
and a run may resume under another one (docs/contracts.md, training data iterator).
"""

import dataclasses
import logging
import math
import queue
import threading

import grain
import numpy as np

from vlm_jax.data.array_records import ArrayRecordSource
from vlm_jax.data.feeds import AheadReader
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax.data.mixture import WeightedSchedule, training_sources
from vlm_jax.data import packing
from vlm_jax.data.packing import Example, NavitExample, NavitRows, TiledRows, check_fits
from vlm_jax.data.synthetic import SyntheticSource
from vlm_jax.errors import BadRecordError, InputError

log = logging.getLogger(__name__)
SOURCES = ("synthetic", "llava_json", "array_record")  # data.source
ON_BAD_RECORD = ("raise", "skip")  # data.on_bad_record
# The stream's counts of left-out records, in metrics.jsonl and the iterator state: records that cannot be used
# (data.on_bad_record=skip) and examples that can never fit a row (data.skip_too_long).
SKIPPED = ("bad_records", "too_long_records")


def make_source(config, split: str, keep_bad: bool = False):
    """The configured record source (data.source) for split 'train' or 'eval'; `keep_bad` keeps llava_json records
    whose structure is wrong (they raise when read) instead of refusing the file at load (array_record shards hold
    no such records: vlm-prepare-data left them out)."""
    d = config.data
    if d.source == "synthetic":
        size = d.num_train if split == "train" else d.num_eval
        # Held-out question types leave only the training data: evaluation still asks every type.
        exclude = tuple(d.exclude_qtypes) if split == "train" else ()
        return SyntheticSource(split, size, config.seed, d.min_image_size, d.max_image_size, exclude)
    if d.source in ("llava_json", "array_record"):
        path = d.path if split == "train" else d.eval_path
        if not path:
            raise ValueError(f"data.eval_path must name the evaluation data for data.source={d.source!r}")
        if d.source == "array_record":  # its bad records were left out when it was written
            return ArrayRecordSource(path, d.max_image_pixels)
        return LlavaJsonSource(path, d.image_folder, d.max_image_pixels, keep_bad)
    raise ValueError(f"unknown data.source {d.source!r}; known: {', '.join(map(repr, SOURCES))}")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """What the example stream holds in place of a record that cannot be used: the packer raises `error` or, with
    data.on_bad_record=skip, leaves the record out."""

    error: BadRecordError


class ReadExample:
    """Record index -> the example of that record of `source` (`convert`: a kind's record_to_example, or its
    footprint of the record's header with `headers`), or a BadRecord naming the source's file, the record's index
    and id and why it cannot be used (its structure, text, image or tokens). `source_index` is the source's index in
    data.mixture, which the example carries into the batch's source_ids. Picklable, as grain maps want."""

    def __init__(self, source, convert, headers: bool = False, source_index: int = 0):
        self.source, self.convert, self.headers, self.source_index = source, convert, headers, source_index

    def __call__(self, index: int):
        index = int(index)
        try:
            ex = self.convert(self.source.header(index) if self.headers else self.source[index])
            return dataclasses.replace(ex, source=self.source_index) if self.source_index else ex
        except BadRecordError as e:
            return BadRecord(BadRecordError(e.reason, self.source.where(index)))


_warned: set[str] = set()  # the bad records this process has logged, each once
_warned_lock = threading.Lock()


def warn_bad_record(error: BadRecordError) -> None:
    """Logs a left-out record, once per record in this process however many epochs and shards meet it."""
    with _warned_lock:
        if error.where in _warned:
            return
        _warned.add(error.where)
    log.warning("skipping bad record (data.on_bad_record=skip): %s", error)


def row_layout(config, grouped: bool = True) -> TiledRows | NavitRows:
    """The fixed row shape of `config`'s batches, as its image-input kind lays them out: `positions`
    [rows, L, 3] for an M-RoPE decoder, rows in groups of `data.vision_group_rows` unless not `grouped`
    (docs/contracts.md)."""
    return data_kind(config.model).row_layout(config, grouped)


# A PackedBatchIterator's position: (stream index, rows - or groups - of its window already yielded, stream indices
# carried into the window, records skipped before the index: SKIPPED).
Position = tuple[int, int, tuple[int, ...], tuple[int, int]]


class PackedBatchIterator:
    """Yields batch dicts (docs/contracts.md) of `rows` rows; checkpointable via get_state/set_state.

    With `window` 0 a row takes consecutive examples while every budget of `layout` (tokens, and tiles or
    patches and images) allows; the first one that does not fit starts the next row. With `window` W the stream
    is cut into windows of W examples and each window's rows are planned together (packing.plan_rows:
    best-fit decreasing), which brings padding down to a few percent; the state is then the window's start and
    the rows of it already yielded. NaViT rows in groups (`layout.group` > 1, which needs a window) are planned a
    window at a time too (packing.plan_groups), and a window passes the examples it could not fit to the next: the
    state then also holds their stream indices. A background thread builds batches ahead (`prefetch` batches)
    from examples that `workers` grain worker processes compute ahead, or with `workers` 0 a pool of `threads`
    threads of this process (PIL, numpy and the tokenizer release the GIL), `lookahead` examples ahead: the
    batches are the same either way (AheadReader). An example that can
    never fit raises InputError naming it, or is skipped with a warning when skip_too_long is set. A BadRecord in
    the stream raises its error, or with `skip_bad` is left out with a warning (once per record and process); with
    `skip_bad` the stream stops with an InputError once its bad records exceed `max_bad_fraction` of its epoch
    length times the epochs begun (a shard's records are bad in every epoch alike, so a dataset whose bad share
    is within the fraction never stops, and a wrong image folder stops in the first epoch). The state counts both
    kinds of skipped records up to its position (SKIPPED), and the examples of each of its `sources` (data.mixture;
    an example's `source`) in the rows yielded so far. With `epoch_size` every epoch of that many stream
    indices is packed on its own (its last row, window or group closes at its end), and after `stop` the rows stay
    empty.
    """

    def __init__(self, examples: grain.MapDataset, *, rows: int, layout: TiledRows | NavitRows,
                 window: int = 0, skip_too_long: bool = False, skip_bad: bool = False, max_bad_fraction: float = 0.0,
                 prefetch: int = 2, workers: int = 0, threads: int = 2, lookahead: int = 8, epoch_size: int = 0,
                 stop: int | None = None, sources: int = 1):
        self.examples, self.rows, self.layout, self.window = examples, rows, layout, window
        self.skip_too_long, self.skip_bad, self.max_bad_fraction = skip_too_long, skip_bad, max_bad_fraction
        # epoch_size n > 0: stream indices [k n, (k + 1) n) are epoch k, packed on their own; the stream ends at
        # `stop` (None: never).
        self.epoch_size, self.stop = epoch_size, stop
        self.prefetch, self.workers, self.threads, self.lookahead = prefetch, workers, threads, lookahead
        if layout.group > 1 and not window:
            raise ValueError(f"data.vision_group_rows={layout.group} plans rows a window at a time: set "
                             "data.pack_window")
        self._position: Position = (0, 0, (), (0, 0))
        self._examples = (0,) * sources  # examples of each source in the rows yielded so far
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))

    # -- state -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """JSON-able state: the stream index of the first example not yet in a yielded batch (with a window:
        of the window being yielded, and how many of its rows - groups of rows when grouped - were; grouped, also
        `carried`, the stream indices of the examples an earlier window passed on to it), and the records skipped
        before that index (`skipped`), and `examples`: how many examples of each source the yielded rows hold."""
        state = dict(next_index=self._position[0], window_rows_done=self._position[1], **self.skipped(),
                     examples=list(self._examples))
        if self.layout.group > 1:
            state["carried"] = list(self._position[2])
        return state

    def skipped(self) -> dict[str, int]:
        """SKIPPED: the records left out before the position of the last batch yielded (what metrics.jsonl shows)."""
        return dict(zip(SKIPPED, self._position[3]))

    def set_state(self, state: dict) -> None:
        self._shutdown()
        # A state saved before the counts existed counts from its position on.
        self._position = (int(state["next_index"]), int(state.get("window_rows_done", 0)),
                          tuple(int(i) for i in state.get("carried", ())),
                          tuple(int(state.get(k, 0)) for k in SKIPPED))
        examples = tuple(int(n) for n in state.get("examples", [0] * len(self._examples)))
        if len(examples) != len(self._examples):
            raise InputError(f"data iterator state counts the examples of {len(examples)} sources, this run's "
                             f"data.mixture has {len(self._examples)}")
        self._examples = examples

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start(self._position)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        batch, self._position, self._examples = item
        return batch

    def close(self) -> None:
        self._shutdown()

    def _start(self, position: Position) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(target=self._produce, args=(position, self._examples, self._stop,
                                                                    self._queue), daemon=True, name="vlm_jax-data")
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None

    def _reader(self, index: int, stop: int | None, skipped: tuple[int, int]) -> "AheadReader":
        return AheadReader(self.examples, index, stop, skipped, self.workers, self.threads, self.lookahead)

    def _produce(self, position: Position, examples_before: tuple[int, ...], stop: threading.Event,
                 out: queue.Queue) -> None:
        reader = self._reader(position[0], self.stop, position[3])
        grouped = self.layout.group > 1
        units, after = self._units(reader, position, self.stop), position
        counts = list(examples_before)
        try:
            while not stop.is_set():
                batch = self.layout.empty(self.rows)
                for unit in range(self.rows // self.layout.group):
                    planned = next(units, None)
                    if planned is None:  # the stream ended: the rest of the batch stays empty
                        break
                    if grouped:
                        examples, plan, after = planned
                        self.layout.write_group(batch, unit, examples, plan)
                        written = [examples[i] for row in plan.rows for i in row]
                    else:
                        examples, after = planned
                        self.layout.write(batch, unit, examples)
                        written = examples
                    for ex in written:
                        counts[ex.source] += 1
                self._put(out, stop, (batch, after, tuple(counts)))
        except BaseException as e:  # surfaced to the consumer on its next call
            self._put(out, stop, e)
        finally:
            reader.cancel()

    def count_units(self, start: int, stop: int, skipped: tuple[int, int] = (0, 0)) -> tuple[int, tuple[int, int]]:
        """How many rows (groups of rows when grouped) the stream's examples [start, stop) pack into, `start`
        the first index of an epoch and `stop` its end, `skipped` the records skipped before `start`; and the
        records skipped before `stop` (data/epochs.py counts epochs with it)."""
        reader = self._reader(start, stop, skipped)
        try:
            return sum(1 for _ in self._units(reader, (start, 0, (), skipped), stop)), reader.skipped()
        finally:
            reader.cancel()

    def _units(self, reader: "AheadReader", position: Position, stop: int | None):
        """The rows (groups) of the stream from `position` up to `stop`, with the position after each."""
        if self.layout.group > 1:
            return self._window_groups(reader, position[1], position[2], stop)
        if self.window:
            return self._window_rows(reader, position[1], stop)
        return self._stream_rows(reader, stop)

    def _epoch_end(self, index: int) -> int | None:
        """The first stream index past the epoch of `index` (None without epochs)."""
        return (index // self.epoch_size + 1) * self.epoch_size if self.epoch_size else None

    def _fitting(self, reader: "AheadReader", end: int | None) -> Example | NavitExample | None:
        """The next example before `end` that can fit a row (not consumed), or None at `end`; raises or skips
        bad records and those that never can fit."""
        while end is None or reader.index < end:
            ex = reader.peek()
            if isinstance(ex, BadRecord):
                self._skip_bad(reader, ex.error)
                continue
            problem = check_fits(ex, self.layout)
            if not problem:
                return ex
            problem = f"example {ex.id}: {problem}"
            if not self.skip_too_long:
                raise InputError(problem)
            log.warning("skipping %s", problem)
            reader.too_long += 1
            reader.advance()
        return None

    def _skip_bad(self, reader: "AheadReader", error: BadRecordError) -> None:
        """Leaves out the bad record at the reader's index, or raises `error` (see the class: max_bad_fraction)."""
        if not self.skip_bad:
            raise error
        reader.bad += 1
        n = len(self.examples)
        epochs = reader.index // n + 1
        if reader.bad > self.max_bad_fraction * n * epochs:
            raise InputError(f"{reader.bad} bad records in the first {epochs} epoch(s) of a data shard of {n} "
                             f"examples, more than data.max_bad_fraction={self.max_bad_fraction} of them (check "
                             f"data.path and data.image_folder, or run vlm-check-data); the last: {error}")
        warn_bad_record(error)
        reader.advance()

    def _stream_rows(self, reader: "AheadReader", stop: int | None):
        """Rows of consecutive examples, each with the position after it."""
        limits = [limit for _, _, limit in self.layout.budgets]
        while stop is None or reader.index < stop:
            end, packed, used = self._epoch_end(reader.index), [], [0] * len(limits)
            while (ex := self._fitting(reader, end)) is not None:
                total = [u + c for u, c in zip(used, self.layout.cost(ex))]
                if any(t > limit for t, limit in zip(total, limits)):
                    break  # `ex` stays unconsumed and starts the next row
                packed.append(ex)
                used = total
                reader.advance()
            if packed:  # empty only when the epoch's last examples were all skipped
                yield packed, (reader.index, 0, (), reader.skipped())

    def _window_rows(self, reader: "AheadReader", skip: int, stop: int | None):
        """Rows planned over windows of `self.window` examples (fewer at an epoch's end), each with the position
        after it; the first `skip` rows of the first window were yielded before a restore."""
        limits = tuple(limit for _, _, limit in self.layout.budgets)
        while stop is None or reader.index < stop:
            start, end, examples = reader.index, self._epoch_end(reader.index), []
            before = reader.skipped()
            while len(examples) < self.window and (ex := self._fitting(reader, end)) is not None:
                examples.append(ex)
                reader.advance()
            plan = packing.plan_rows([self.layout.cost(ex) for ex in examples], limits)
            for k in range(skip, len(plan)):
                after = (reader.index, 0, (), reader.skipped()) if k == len(plan) - 1 else (start, k + 1, (), before)
                yield [examples[i] for i in plan[k]], after
            skip = 0

    def _window_groups(self, reader: "AheadReader", skip: int, carried: tuple[int, ...], stop: int | None):
        """Groups planned over the examples carried into each window and `self.window` more (fewer at an epoch's
        end, where nothing is carried on), each as (the window's examples, its PlannedGroup, the position after
        it); the first `skip` groups of the first window were yielded before a restore."""
        held = [self.examples[i] for i in carried]  # re-read: only their stream indices are in the state
        while stop is None or reader.index < stop:
            start, end, indices, examples = reader.index, self._epoch_end(reader.index), list(carried), list(held)
            before = reader.skipped()
            while len(examples) - len(held) < self.window and (ex := self._fitting(reader, end)) is not None:
                examples.append(ex)
                indices.append(reader.index)
                reader.advance()
            groups, left = packing.plan_groups([len(ex) for ex in examples],
                                               [[math.prod(grid) for _, grid in ex.images] for ex in examples],
                                               self.layout, carried=len(carried), flush=reader.index == end)
            for k in range(skip, len(groups)):
                last = k == len(groups) - 1
                after = ((reader.index, 0, tuple(indices[i] for i in left), reader.skipped()) if last
                         else (start, k + 1, carried, before))
                yield examples, groups[k], after
            skip, carried, held = 0, tuple(indices[i] for i in left), [examples[i] for i in left]

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                pass


class ShardedBatchIterator:
    """Yields the rows of some of the data shards of every batch, in shard order: one PackedBatchIterator per
    shard, each packing its own stream (`make_example_dataset`) into its own rows. The batch of all `shards`
    shards is the same however they are divided between processes. get_state() holds each of its shards' states
    under its shard index; `merge_shard_states` joins those of several processes into the state of every shard,
    which set_state takes whichever shards an iterator has."""

    def __init__(self, iterators: dict[int, PackedBatchIterator], shards: int):
        self.iterators, self.shards = dict(sorted(iterators.items())), shards

    def get_state(self) -> dict:
        """JSON-able: {"shards": data.shards, "states": {str(shard): PackedBatchIterator state}} of its shards."""
        return dict(shards=self.shards, states={str(s): it.get_state() for s, it in self.iterators.items()})

    def set_state(self, state: dict) -> None:
        if "shards" not in state:  # saved before data shards existed: one process's stream is shard 0 of 1
            if state["process_count"] != 1:
                raise ValueError(f"data iterator state of a {state['process_count']}-process run from before "
                                 "data.shards: its stream depended on the process count and cannot be continued")
            state = dict(shards=1, states={"0": state})
        if state["shards"] != self.shards:
            raise ValueError(f"data iterator state is for data.shards={state['shards']}, this run has data.shards="
                             f"{self.shards}: a run continues its stream with the same data.shards")
        missing = [s for s in self.iterators if str(s) not in state["states"]]
        if missing:
            raise ValueError(f"data iterator state has no state for data shards {missing}")
        for s, it in self.iterators.items():
            it.set_state(state["states"][str(s)])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(it) for it in self.iterators.values()]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def close(self) -> None:
        for it in self.iterators.values():
            it.close()


def merge_shard_states(states: list[dict]) -> dict:
    """One ShardedBatchIterator state holding every shard, from the states of iterators that together hold them
    all (one per process; a shard held by several is the same in each)."""
    shards = {s["shards"] for s in states}
    if len(shards) != 1:
        raise ValueError(f"data iterator states disagree on data.shards: {sorted(shards)}")
    merged = {k: v for s in states for k, v in s["states"].items()}
    (n,) = shards
    missing = [s for s in range(n) if str(s) not in merged]
    if missing:
        raise ValueError(f"no data iterator holds data shards {missing} of data.shards={n}")
    return dict(shards=n, states={str(s): merged[str(s)] for s in range(n)})


def skipped_counts(state: dict) -> dict[str, int]:
    """SKIPPED summed over the shards of a ShardedBatchIterator state (`merge_shard_states` of every process's,
    so that a shard several processes build counts once)."""
    return {k: sum(s[k] for s in state["states"].values()) for k in SKIPPED}


def example_counts(state: dict, names: tuple[str, ...]) -> dict[str, int]:
    """examples/<name>: the examples of each source (`names`, data.mixture's order) that the batches so far hold,
    summed over the shards of a ShardedBatchIterator state as `skipped_counts` sums."""
    return {f"examples/{name}": sum(s["examples"][k] for s in state["states"].values())
            for k, name in enumerate(names)}


def shard_rows(config) -> int:
    """Rows of every batch that each data shard packs: batch_size / data.shards, whole groups of
    data.vision_group_rows."""
    shards, group = config.data.shards, config.data.vision_group_rows
    if shards < 1 or config.batch_size % shards:
        raise ValueError(f"data.shards={shards} must divide batch_size {config.batch_size}")
    if (config.batch_size // shards) % group:
        raise ValueError(f"data.shards={shards} cuts batch_size {config.batch_size} into shards of "
                         f"{config.batch_size // shards} rows, not whole groups of data.vision_group_rows={group}")
    return config.batch_size // shards


def shards_holding(config, rows: list[tuple[int, int]], holder: str = "this process") -> list[int]:
    """The data shards that rows [start, stop) of the batch (of a process's devices) make up; one error naming
    data.shards unless they are whole shards."""
    n, shards = shard_rows(config), config.data.shards
    held = set().union(*(range(a, b) for a, b in rows))
    whole = [s for s in range(shards) if set(range(s * n, (s + 1) * n)) <= held]
    if held != set().union(*(range(s * n, (s + 1) * n) for s in whole)) or not whole:
        spans = ", ".join(f"{a}-{b - 1}" for a, b in sorted(set(rows)))
        raise ValueError(f"data.shards={shards} cuts the batch of {config.batch_size} rows into shards of {n}, but "
                         f"{holder} holds rows {spans}, not whole shards: data.shards must be a multiple of the "
                         "process count")
    return whole


def shard_stream(config, size: int, shard: int = 0, shards: int = 1) -> grain.MapDataset:
    """Shuffled, infinite stream of the record indices [0, size) of a source, of data shard `shard` of `shards`
    (index past len = next epoch, reshuffled): records shard, shard + shards, ... of the shuffled source; its len
    is the shard's share of an epoch."""
    if size < shards:
        raise ValueError(f"training source has {size} examples, fewer than data.shards={shards}")
    return grain.MapDataset.range(size).shuffle(seed=config.seed % 2**32)[shard::shards]


def make_example_dataset(config, tokenizer, shard: int = 0, shards: int = 1) -> grain.MapDataset:
    """Shuffled, infinite stream of training Examples (or BadRecords) of data shard `shard` of `shards`
    (`shard_stream`); with a mixture, the sources' shard streams interleaved by weight (`WeightedSchedule`)."""
    kind, streams = data_kind(config.model), []
    sources = training_sources(config)
    for k, s in enumerate(sources):
        source = make_source(s.config, "train", keep_bad=config.data.on_bad_record == "skip")
        read = ReadExample(source, kind.record_to_example(s.config, tokenizer), source_index=k)
        streams.append(shard_stream(s.config, len(source), shard, shards).map(read))
    if len(streams) == 1:
        return streams[0]
    schedule = WeightedSchedule([s.weight for s in sources], [len(x) for x in streams])
    return grain.MapDataset.select_from_datasets(streams, schedule)


def epoch_bounds(config, epoch_size: int) -> tuple[int, int | None]:
    """(epoch_size, stop) of a shard stream whose epochs hold `epoch_size` examples: (0, None), an endless stream
    packed across epochs, with data.epochs 0; else epochs packed on their own, the stream ending after
    data.epochs of them."""
    epochs = config.data.epochs
    if epochs < 0:
        raise ValueError(f"data.epochs={epochs}: 0 (run total_steps) or the number of passes over the data")
    return (epoch_size, epochs * epoch_size) if epochs else (0, None)


def make_train_iterator(config, tokenizer, shards: list[int] | None = None) -> ShardedBatchIterator:
    """Training batches of the data shards `shards` (default: all of data.shards, the whole batch of
    config.batch_size rows), batch_size / data.shards rows each, in shard order (docs/contracts.md).

    Each batch is a dict of numpy arrays: tokens, targets, positions, segment_ids, source_ids int32 [B, L];
    loss_mask float32 [B, L]; tiles float32 [B, T, S, S, 3]; tile_mask bool [B, T]; image_dest int32
    [B, T*P] - or for a NaViT model patches, patch_positions, patch_segment_ids and image_dest [B, N/4],
    and positions [B, L, 3] with an M-RoPE decoder (docs/contracts.md). The iterator has get_state() -> small
    JSON-able dict and set_state(dict). With data.epochs > 0 each shard's rows end after that many epochs (later
    batches hold empty rows there).
    Optional config keys: data.skip_too_long (default False: an over-long example is an error),
    data.on_bad_record and data.max_bad_fraction (a record that cannot be used is an error, or left out),
    data.workers (worker processes per shard computing the examples; 0: data.threads threads of this process),
    data.prefetch (batches built ahead).
    """
    d, rows = config.data, shard_rows(config)
    count = d.shards
    shards = list(range(count)) if shards is None else sorted(shards)
    if not shards or not set(shards) <= set(range(count)):
        raise ValueError(f"data shards {shards}: data.shards={count} numbers them 0 to {count - 1}")
    layout = row_layout(config)
    iterators = {}
    for s in shards:
        examples = make_example_dataset(config, tokenizer, s, count)
        epoch_size, stop = epoch_bounds(config, len(examples))
        iterators[s] = PackedBatchIterator(
            examples, rows=rows, layout=layout, window=d.pack_window, skip_too_long=d.skip_too_long,
            skip_bad=d.on_bad_record == "skip", max_bad_fraction=d.max_bad_fraction, prefetch=d.prefetch,
            workers=d.workers, threads=d.threads, lookahead=max(8, 4 * d.workers), epoch_size=epoch_size,
            stop=stop, sources=len(training_sources(config)))
    return ShardedBatchIterator(iterators, count)


def make_eval_examples(config, tokenizer, n: int) -> list[dict]:
    """The first n records of the eval split, tokenised in generation form (unpadded).

    Each dict: id (str); tokens int32 [m], the prompt through the assistant prefix (bos included
    where the template has one); tiles float32 [k, S, S, 3] (k=0 for text-only), or for a NaViT model
    images, a list of (patches, grid) per image (`navit.navit_patches`); image_positions int32 [V], the
    index in `tokens` of each visual token (tile-major, or one per merge window, as image_dest wants:
    add the left-pad offset when padding); positions int32 [m] (0, 1, 2, ...), or [m, 3] M-RoPE ids for an
    M-RoPE decoder (`navit.example_mrope_positions`); question (str) the last human turn without the image marker;
    answer (str) the reference; qtype (str); raw_images, the record's images (RGB PIL images, [] for text-only);
    image, the first of them or None (what evaluate.py's plots show). Generation stops at
    records.make_encoder(config, tokenizer).stop_id.
    """
    source = make_source(config, "eval")
    if n > len(source):
        raise ValueError(f"asked for {n} eval examples, the eval source has {len(source)}")
    to_prompt = PromptExample(config, tokenizer, source)
    return [to_prompt(i) for i in range(n)]


class PromptExample:
    """Record index of an eval `source` -> its make_eval_examples dict. A bad record raises its BadRecordError,
    naming the file, index and id, whatever data.on_bad_record says: an eval set is asked whole."""

    def __init__(self, config, tokenizer, source):
        self.source, self.to_prompt = source, PromptBuilder(config, tokenizer)

    def __call__(self, i: int) -> dict:
        try:
            record = self.source[i]
            images = self.to_prompt.to_example.images(record)
            example, answer = self.to_prompt.build(record["conversations"], images, record["id"])
        except BadRecordError as e:
            raise BadRecordError(e.reason, self.source.where(i)) from None
        question = record["conversations"][-2][1].replace("<image>", "").strip()
        raw = record["images"]
        return dict(example, question=question, answer=answer, qtype=record["qtype"], raw_images=raw,
                    image=raw[0] if raw else None)


class PromptBuilder:
    """Conversation turns and their images (the kind's `record_to_example(...).images` of each) -> a generation
    prompt: the make_eval_examples dict without the record's fields (id, tokens, image_positions, positions and the
    kind's image fields)."""

    def __init__(self, config, tokenizer):
        kind = data_kind(config.model)
        self.mrope, self.to_example = kind.mrope(), kind.record_to_example(config, tokenizer)

    def build(self, turns, images: list, example_id: str) -> tuple[dict, str | None]:
        """(prompt dict, the reference answer when `turns` ends with one: encode_prompt's)."""
        to_example = self.to_example
        lengths = to_example.run_lengths(images)
        enc, answer = to_example.encoder.encode_prompt(turns, lengths, example_id)
        image_positions = np.concatenate([s + np.arange(k) for s, k in zip(enc.image_starts, lengths)]
                                         or [np.zeros((0,), np.int32)]).astype(np.int32)
        if self.mrope:
            positions = to_example.mrope_positions(len(enc.tokens), enc.image_starts, images)
        else:
            positions = np.arange(len(enc.tokens), dtype=np.int32)
        return dict(id=example_id, tokens=enc.tokens, image_positions=image_positions, positions=positions,
                    **to_example.prompt_fields(images)), answer
