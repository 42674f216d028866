"""The trainer: build mesh and state, restore or init, iterate batches, step, log, checkpoint."""

import functools
import json
import logging
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vlm_jax import image_inputs, parallel
from vlm_jax.benchmarks import read_tsv
from vlm_jax.checkpoints.directory import carry_source, write_trained
from vlm_jax.checkpoints.params_only import restore_params
from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.checkpoints.workdir import is_workdir, restore_workdir_params
from vlm_jax.config import check_values, to_json
from vlm_jax.data.epochs import count_epochs, epoch_steps
from vlm_jax.data.image_kinds import report_image_processor
from vlm_jax.data.mixture import mixture_names
from vlm_jax.data.pipeline import (example_counts, make_train_iterator, merge_shard_states, row_layout,
                                   shards_holding, skipped_counts)
from vlm_jax.data.tokenizer import record_tokenizer, run_tokenizer
from vlm_jax.errors import DivergedError, InputError
from vlm_jax.evaluate import training_eval
from vlm_jax.inference import Assistant
from vlm_jax.layers.attention import resolve_backend
from vlm_jax.model import VLM
from vlm_jax.train.flops import step_s_at_peak
from vlm_jax.train.metrics import MetricsLogger, plot_loss
from vlm_jax.train.optim import make_optimizer
from vlm_jax.train.param_groups import ParamGroups
from vlm_jax.train.preemption import StopSignals
from vlm_jax.train.profiling import StepTrace
from vlm_jax.train.resume import check_resume
from vlm_jax.train.step import TrainState, all_finite, init_state, make_train_step


class Setup:
    """Everything a train or eval run derives from the config: mesh, model, shardings, state."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
        self.config = config
        self.mesh = parallel.make_mesh(config.mesh, devices)
        self.model = VLM(config.model)
        rng = jax.random.PRNGKey(config.seed)
        self._init_params = lambda key: self.model.init(key, *image_inputs.dummy_inputs(config.model))["params"]
        boxed = jax.eval_shape(self._init_params, rng)
        self.param_shardings = param_shardings = parallel.logical_shardings(boxed, self.mesh)
        self.abstract_params = abstract_params = nn.meta.unbox(boxed)
        self.groups = ParamGroups(abstract_params, config.optim)
        self.optimizer = make_optimizer(config.optim, self.groups, config.total_steps)
        frozen_dtype = config.model.frozen_param_dtype or config.model.param_dtype
        self.init_state = functools.partial(init_state, self.optimizer, self.groups, frozen_dtype=jnp.dtype(frozen_dtype))
        self.abstract_state = jax.eval_shape(self.init_state, abstract_params)
        train_sh, frozen_sh = self.groups.split(param_shardings)
        rep = parallel.replicated(self.mesh)
        self.state_shardings = TrainState(
            step=rep, trainable=train_sh, frozen=frozen_sh,
            opt_state=opt_state_shardings(self.abstract_state.opt_state, train_sh, rep))
        self.rng = rng

    def fresh_state(self) -> TrainState:
        def build(key):
            return self.init_state(nn.meta.unbox(self._init_params(key)))
        with jax.set_mesh(self.mesh):
            return jax.jit(build, out_shardings=self.state_shardings)(self.rng)

    def imported_state(self, path: str) -> TrainState:
        """A fresh state (new optimizer) whose parameters come from `path` for every leaf it holds, fresh
        init elsewhere: a params-only checkpoint directory (`path/params`, from `launch/convert.py import` or
        a soup), or a training workdir (`WORKDIR[@STEP]`: a previous stage's run, whatever its optimizer).
        Leaves whose path matches `config.init_fresh` keep their fresh init."""
        if is_workdir(path) and not os.path.isdir(os.path.join(path, "params")):
            loaded = restore_workdir_params(path, self.abstract_params, self.param_shardings)
        else:
            loaded = restore_params(os.path.join(path, "params"), self.abstract_params, self.param_shardings)
        loaded = traverse_util.flatten_dict(loaded)
        fresh = self.config.init_fresh
        if fresh:  # e.g. a re-initialised projector (the seeds' stage 1 starts one from scratch)
            kept = {k: v for k, v in loaded.items() if not re.fullmatch(fresh, "/".join(k))}
            if len(kept) == len(loaded):
                raise ValueError(f"init_fresh={fresh!r} matches no parameter that {path} holds")
            loaded = kept
        params = traverse_util.flatten_dict(self.fresh_state().params)
        params.update({k: v.astype(params[k].dtype) for k, v in loaded.items()})
        logging.info("initialised %d of %d parameter arrays from %s", len(loaded), len(params), path)
        with jax.set_mesh(self.mesh):
            return jax.jit(self.init_state,
                           out_shardings=self.state_shardings)(traverse_util.unflatten_dict(params))


    def restored_state(self, ckpt: Checkpointer, step: int) -> tuple[TrainState, dict]:
        """(state, data-iterator state) of `ckpt`'s step-`step` checkpoint, placed on this mesh."""
        saved, data_state = ckpt.restore(step, self.abstract_state.saved(), self.state_shardings.saved())
        return TrainState.from_saved(saved, self.groups), data_state


def opt_state_shardings(abstract_opt_state, param_shardings, default):
    """Each optimizer-state leaf shaped like a parameter (Adam's mu, nu) takes that parameter's sharding,
    found by the trailing dict keys of its tree path; counts and other leaves take `default`.

    By path rather than optax.tree_map_params, which cannot see through multi_transform's masked states."""
    by_path = traverse_util.flatten_dict(param_shardings)

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        return by_path.get(tuple(keys), default) if getattr(leaf, "ndim", 0) else default

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def check_batch_size(config: ml_collections.ConfigDict, mesh) -> None:
    dp = parallel.data_parallel_size(mesh)
    if config.batch_size % dp or config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} must divide by the data x fsdp mesh size {dp} "
                         f"and the process count {jax.process_count()}")
    n = config.micro_batches
    if n < 1 or config.batch_size % (n * dp):
        raise ValueError(f"micro_batches={n}: batch_size {config.batch_size} must split into that many micro-batches "
                         f"of a multiple of the data x fsdp mesh size {dp} rows")
    g = config.data.vision_group_rows
    if g > 1 and config.batch_size % (n * dp * g):
        raise ValueError(f"data.vision_group_rows={g}: batch_size {config.batch_size} must split into "
                         f"micro_batches={n} x the data x fsdp mesh size {dp} x groups of {g} rows, so that every "
                         "group of rows stays on one device")


def check_segments(config: ml_collections.ConfigDict) -> None:
    """The cudnn attention backend holds model.max_segments packed segments per row: rows must not hold more."""
    d, m = config.data, config.model
    most = max(d.max_examples_per_row, image_inputs.make(m).segments_per_row(d))
    if resolve_backend(m.attention) == "cudnn" and most > m.max_segments:
        raise ValueError(f"model.attention='cudnn' holds model.max_segments={m.max_segments} segments per row, "
                         f"but rows may hold {most} (data.max_examples_per_row / data.max_images_per_row)")


def process_shards(config: ml_collections.ConfigDict, mesh) -> list[int]:
    """The data shards that make up the rows of the batch this process's devices hold (`shards_holding`)."""
    index = parallel.batch_sharding(mesh).devices_indices_map((config.batch_size,))
    rows = [i[0].indices(config.batch_size)[:2] for d, i in index.items() if d.process_index == jax.process_index()]
    return shards_holding(config, rows, f"process {jax.process_index()} of {jax.process_count()}")


def allgather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [value]
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size])).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(b[:n])) for b, n in zip(blobs, sizes)]


def with_epoch_length(config: ml_collections.ConfigDict, tokenizer, shards: list[int]) -> ml_collections.ConfigDict:
    """`config` with total_steps the length of data.epochs epochs (data/epochs.py): each process counts the data
    shards `shards` it builds, and every process takes the same total from all of them."""
    mine = {str(s): c for s, c in count_epochs(config, tokenizer, shards).items()}
    counts = {int(s): c for part in allgather_json(mine) for s, c in part.items()}
    config = config.copy_and_resolve_references()
    config.total_steps = epoch_steps(config, counts)
    group = row_layout(config).group
    logging.info("data.epochs=%d: %s rows an epoch, %d steps of %d rows", config.data.epochs,
                 [group * sum(c[e] for c in counts.values()) for e in range(config.data.epochs)],
                 config.total_steps, config.batch_size)
    return config


def last_checkpoint(ckpt: Checkpointer, workdir: str) -> str:
    step = ckpt.latest_step()
    return f"the last checkpoint is step {step} in {workdir}" if step is not None else f"{workdir} holds no checkpoint"


def train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None,
          profile_steps: tuple[int, int] | None = None) -> TrainState:
    """Trains to `config.total_steps` (with data.epochs > 0: to the end of that many epochs, counted first),
    resuming from the latest checkpoint in `workdir` if any.

    `stop_at` ends the run early (after checkpointing that step) as a preemption would, without
    changing the schedule, which depends on total_steps. `profile_steps` (A, B) writes a profiler trace of steps A
    to B into WORKDIR/profile (train/profiling.py). With several processes each builds only the data shards
    of its devices' rows (the batch is the same at any process count), every checkpoint holds every shard's
    iterator state, and process 0 alone writes the metrics, TensorBoard events, loss plot and param_groups.json.

    SIGTERM and SIGINT (a preemption, Ctrl-C) received while it runs end it the same way after the step under way
    (after the first step if they come before it), every process after the same step (train/preemption.py).
    """
    check_values(config)
    with StopSignals() as signals:
        return _train(config, workdir, stop_at, profile_steps, signals)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None,
           profile_steps: tuple[int, int] | None, signals: StopSignals) -> TrainState:
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh)
    check_batch_size(config, mesh)
    check_segments(config)
    tokenizer = run_tokenizer(config)
    if len(tokenizer) > config.model.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.text.vocab_size is "
                         f"{config.model.text.vocab_size}")
    if config.eval_every and config.eval_benchmark:
        read_tsv(config.eval_benchmark)  # a missing or malformed file stops the run now, not at its first evaluation
    shards = process_shards(config, mesh)
    if config.data.epochs:
        config = with_epoch_length(config, tokenizer, shards)
    setup = Setup(config)
    at_peak = step_s_at_peak(setup)  # before the data workers start: on a CPU it times a GEMM on the quiet host
    data = make_train_iterator(config, tokenizer, shards)
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    try:  # whatever refuses the run does so before anything is written in the workdir
        start = ckpt.latest_step()
        if start is None:
            state = setup.imported_state(config.init_params) if config.init_params else setup.fresh_state()
            start = 0
        else:
            check_resume(config, ckpt.read_config(start), workdir, start,
                         lambda saved: Setup(saved).abstract_state.saved(), setup.abstract_state.saved())
            state, data_state = setup.restored_state(ckpt, start)
            data.set_state(data_state)
            logging.info("resumed from step %d", start)
    except BaseException:
        ckpt.close()  # no orbax thread is left to fail at exit
        data.close()
        raise
    if start == 0 and config.init_params:
        carry_source(config.init_params, workdir)  # what export needs of the source: its ids, carried tensors
    if jax.process_index() == 0:
        print(setup.groups.format_table(), flush=True)
        setup.groups.write_table(workdir)
    write_trained(workdir, ["/".join(p) for p in setup.groups.assignments if setup.groups.trains(p)])
    report_image_processor(config, workdir if jax.process_index() == 0 else None)
    if jax.process_index() == 0:
        record_tokenizer(tokenizer, workdir)
    ckpt.empty_trash()  # what a process killed while deleting an old checkpoint left
    names = mixture_names(config)  # a mixture's sources: examples/<name> and loss/<name> in metrics.jsonl
    step_fn = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings, seed=config.seed,
                              micro_batches=config.micro_batches, sources=names)
    logger = MetricsLogger(workdir, start, config.total_steps, at_peak)
    trace = StepTrace(profile_steps, workdir, start)

    def close_all() -> None:  # before raising too: a stopped run leaves no producer or writer threads running
        trace.close()
        ckpt.close()
        data.close()
        logger.close()

    # eval_every: the model as it trains answers the run's evaluation, with the run's tokenizer and template.
    assistant = Assistant(config, None, tokenizer, setup.mesh) if config.eval_every else None
    config_json, tokens_seen, token_counts = to_json(config), 0, []
    skips, in_a_row = [], 0  # each step's `skipped` flag, read when logged; the steps skipped in a row so far
    finite = jax.jit(all_finite, out_shardings=parallel.replicated(setup.mesh))
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    for step in range(start + 1, end + 1):
        trace.before(step, state)
        try:
            batch = parallel.global_batch(logger.next_batch(data), setup.mesh)
        except InputError:  # a bad record: its one-line error comes after the progress bar's line, not on it
            close_all()
            raise
        token_counts.append(jnp.count_nonzero(batch["segment_ids"]))  # of the global batch, read when logged
        state, metrics = step_fn(state, batch)
        trace.after(step, (state, metrics))
        skips.append(metrics.pop("skipped"))
        logger.advance()
        preempted = step < end and signals.agreed()
        last = step == end or preempted
        saving = last or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
        evaluating = assistant is not None and step % config.eval_every == 0
        if saving or evaluating or step % config.log_every == 0:
            tokens_seen += sum(int(n) for n in jax.device_get(token_counts))
            token_counts = []
            flags = [bool(s) for s in jax.device_get(skips)]
            skips = []
            # The records every shard left out before this step's data position (each process holds some shards),
            # and the examples of each source its batches held.
            data_state = merge_shard_states(allgather_json(data.get_state()))
            left_out = {**skipped_counts(data_state), **example_counts(data_state, names)}
            # A source none of whose tokens the step held has no loss/<name> that step (NaN from the step).
            step_metrics = {k: v for k, v in jax.device_get(metrics).items()
                            if not (k.startswith("loss/") and np.isnan(v))}
            scores, paused = {}, time.perf_counter()
            if evaluating:
                assistant.params = state.params
                scores = training_eval(assistant)
            logger.log(step, {**step_metrics, "skipped_steps": sum(flags), **left_out, **scores},
                       tokens_seen, time.perf_counter() - paused if evaluating else 0.0)
            for s, skipped in enumerate(flags, step - len(flags) + 1):
                in_a_row = in_a_row + 1 if skipped else 0
                if skipped and jax.process_index() == 0:
                    logging.warning("step %d skipped its update: non-finite loss, gradient norm or parameters (%d in a "
                                    "row; optim.max_skipped_steps=%d stops the run)", s, in_a_row,
                                    config.optim.max_skipped_steps)
                if in_a_row == config.optim.max_skipped_steps:
                    close_all()
                    raise DivergedError(
                        f"{in_a_row} steps in a row (optim.max_skipped_steps) skipped their update for a non-finite "
                        f"loss, gradient norm or parameters, the last at step {s}; {last_checkpoint(ckpt, workdir)}")
        if saving:
            if not bool(finite(state.saved())):  # the step keeps NaN out of the state; never save one it reached
                close_all()
                raise DivergedError(f"the state at step {step} holds non-finite values and was not saved; "
                                    f"{last_checkpoint(ckpt, workdir)}")
            ckpt.save(step, state.saved(), merge_shard_states(allgather_json(data.get_state())), config_json)
        if preempted:
            break
    trace.close()
    ckpt.close()
    if jax.process_index() == 0 and start < end and step < config.total_steps:
        then = "rerun the same command to resume" if preempted else "rerun without stop_at to go on"
        print(f"{'preempted' if preempted else 'stopped (stop_at)'} at step {step}; checkpoint written; {then}",
              flush=True)
    data.close()
    logger.close()
    if jax.process_index() == 0 and os.path.exists(logger.path):
        plot_loss(workdir, os.path.join(workdir, "loss.png"))
    return state
