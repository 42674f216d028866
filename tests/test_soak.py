"""Kill -9 soak (issue 23): a tiny `vlm-train` run, checkpointing every step with the trainer's asynchronous saves,
is SIGKILLed ten times at moments drawn from a seeded RNG - at start-up, mid-step and while a checkpoint save is in
flight (the last kill always during the last step's save) - and rerun after each kill. Every rerun must resume
from the last checkpoint that was complete when the process died, and the run must end bitwise equal to the same
command run straight through: parameters, optimizer state and data-iterator state, with metrics.jsonl holding each
step once, in order, with the straight run's values.

Out of the default run (a few minutes: twelve processes start); `pytest -m soak -s tests/test_soak.py` runs it and
prints the seed and what each kill hit. VLM_SOAK_SEED=N replays a seed's plan: the moments are drawn as points of
the run's own progress (a step's line, a save's start) plus fractions of the step and save times measured on the
straight run, so a loaded machine kills at the same points of the work; what a kill lands on can still differ."""

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import ROOT, TINY, assert_bitwise_equal, tiny_config
from vlm_jax.checkpoints.train_state import TRASH, Checkpointer
from vlm_jax.train import loop
from vlm_jax.train.metrics import MetricsLogger

STEPS = 20
# A checkpoint every step: every step boundary starts an asynchronous save, and with keep_checkpoints (2) each
# save's finish moves the checkpoint before last out to be deleted.
RUN = (f"total_steps={STEPS}", "checkpoint_every=1")
COMMAND = [sys.executable, "-m", "vlm_jax.cli.train", "--config", os.path.join(ROOT, "configs/demo.py")] + [
    f"--config.{o}" for o in TINY + list(RUN)]
TMP = ".orbax-checkpoint-tmp"  # orbax saves step N into N.orbax-checkpoint-tmp* and commits it by renaming it N
# Wall-clock rates and shares: the only metrics that differ between runs.
TIMING_KEYS = ("tokens_per_s", "steps_per_s", "time/step_s", "time/data_wait_fraction", "mfu")
LAUNCH_TIMEOUT = 300  # seconds a process may take to reach its kill point or to finish, on a loaded machine
POLL = 0.003  # seconds between looks at the workdir: far below a save's time, so each save is seen in flight


def draw_plan(rng: random.Random) -> list[tuple[str, float, int]]:
    """Ten kills as (kind, u, step), spread over the run: a start-up kill comes u of the shortest start-up seen so
    far after the launch; a step kill u of a step's time after `step`'s line; a save kill u of a save's time after
    the save of `step` began (a launch that resumes past `step` is killed at the step after the one it resumes
    from). The last kill is in the save of the last step; the first is not at start-up, which is timed first."""
    kinds = ["start-up"] * 3 + ["step"] * 3 + ["save"] * 3
    rng.shuffle(kinds)
    if kinds[0] == "start-up":
        first = next(i for i, k in enumerate(kinds) if k != "start-up")
        kinds[0], kinds[first] = kinds[first], kinds[0]
    # Short of the last step, after which the process may end before a kill lands.
    steps = iter(sorted(rng.sample(range(1, STEPS), 6)))
    return [(k, rng.random(), 0 if k == "start-up" else next(steps)) for k in kinds] + [("save", rng.random(), STEPS)]


def soak_seed() -> int:
    text = os.environ.get("VLM_SOAK_SEED", "")
    if text and not text.isdigit():
        raise ValueError(f"environment variable VLM_SOAK_SEED={text!r} is not a seed (a non-negative integer)")
    return int(text) if text else random.SystemRandom().randrange(2 ** 32)


def logged_steps(workdir: str) -> list[int]:
    """The steps of metrics.jsonl's lines (a line being written, or torn by a kill, is not one)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().split("\n")[:-1]  # only complete lines
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


def metrics_stamp(workdir: str) -> tuple[int, int]:
    stat = os.stat(os.path.join(workdir, "metrics.jsonl"))
    return stat.st_mtime_ns, stat.st_size


def checkpoint_dirs(workdir: str) -> tuple[list[int], dict[str, int]]:
    """(committed steps, sorted; {temporary save directory: its creation time in ns})."""
    folder = os.path.join(workdir, "checkpoints")
    committed, temporary = [], {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.isdigit():
            committed.append(int(name))
        elif TMP in name:
            try:
                temporary[name] = os.stat(os.path.join(folder, name)).st_ctime_ns
            except FileNotFoundError:  # committed (renamed) meanwhile
                pass
    return sorted(committed), temporary


def leftovers(workdir: str) -> list[str]:
    """What checkpoints/ holds: steps, temporary directories and the deleted checkpoints not yet removed."""
    return sorted(os.listdir(os.path.join(workdir, "checkpoints"))) + [f"{TRASH}/{name}" for name in trash(workdir)]


def count_files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def skeleton(path: str) -> set[str]:
    """The files of a checkpoint directory whose names are the same in every checkpoint (not ocdbt's data files)."""
    return {os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path)
            if os.path.basename(root) != "d" for f in files}


def torn_steps(workdir: str, complete: set[str]) -> list[int]:
    """The committed checkpoints of `workdir` that lack some of the files `complete` names."""
    return [c for c in checkpoint_dirs(workdir)[0]
            if not complete <= skeleton(os.path.join(workdir, "checkpoints", str(c)))]


def trash(workdir: str) -> list[str]:
    """The checkpoints moved out of the steps and not yet deleted."""
    folder = os.path.join(workdir, "checkpoints", TRASH)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


class Launch:
    """One `vlm-train` process on `workdir`, watched: when each of its steps' lines reaches metrics.jsonl, when
    each of its checkpoint saves begins and is committed. Lines and temporary directories left by an earlier,
    killed process are not its: the lines after the checkpoint it resumes from stay until its metrics logger drops
    them, and a torn save stays until the same step is saved again (orbax removes it and creates it anew)."""

    def __init__(self, workdir: str, log: str, env: dict):
        self.workdir, self.log = workdir, log
        committed, self.stale_tmp = checkpoint_dirs(workdir)
        self.resumes_from = committed[-1] if committed else 0
        # The new process's first write to metrics.jsonl is its logger's rewrite without the stale lines.
        stale = max(logged_steps(workdir), default=0) > self.resumes_from
        self.metrics_before = metrics_stamp(workdir) if stale else None
        # Seconds after the launch when each was first seen, by step: its metrics line, its save's temporary
        # directory, the committed checkpoint.
        self.lines: dict[int, float] = {}
        self.saving: dict[int, float] = {}
        self.committed: dict[int, float] = {}
        with open(log, "w") as out:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(COMMAND + ["--workdir", workdir], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def saves_in_flight(self) -> dict[int, str]:
        """{step: temporary directory} of the saves this process began that are not committed."""
        return {int(name.split(".")[0]): name for name, t in checkpoint_dirs(self.workdir)[1].items()
                if self.stale_tmp.get(name) != t}

    def look(self) -> None:
        now = self.elapsed()
        for step in self.saves_in_flight():
            self.saving.setdefault(step, now)
        for step in checkpoint_dirs(self.workdir)[0]:
            if step > self.resumes_from:
                self.committed.setdefault(step, now)
        if self.metrics_before is not None:
            if metrics_stamp(self.workdir) == self.metrics_before:
                return
            self.metrics_before = None
        for step in logged_steps(self.workdir):
            if step > self.resumes_from:
                self.lines.setdefault(step, now)

    def wait_for(self, ready, what: str) -> None:
        """Looks at the workdir until `ready()`; fails if the process exits or hangs first."""
        while True:
            self.look()
            if ready():
                return
            if self.proc.poll() is not None:
                raise Failure(f"the process exited (status {self.proc.returncode}) before {what}:\n{self.tail()}")
            if self.elapsed() > LAUNCH_TIMEOUT:
                self.kill()
                raise Failure(f"no {what} after {LAUNCH_TIMEOUT} s:\n{self.tail()}")
            time.sleep(POLL)

    def finish(self) -> int:
        """Watches the process to its end; its exit status."""
        while self.proc.poll() is None:
            self.look()
            if self.elapsed() > LAUNCH_TIMEOUT:
                self.kill()
                raise Failure(f"the run did not end in {LAUNCH_TIMEOUT} s:\n{self.tail()}")
            time.sleep(POLL)
        self.look()
        return self.proc.returncode

    def kill(self) -> float:
        """SIGKILL; the seconds since the launch when it was sent."""
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the process and anything it started
        when = self.elapsed()
        self.proc.wait()
        return when

    def resumed_from(self) -> int | None:
        """The step the process said it resumed from; None if it said none (yet)."""
        with open(self.log) as f:
            found = re.findall(r"resumed from step (\d+)", f.read())
        return int(found[-1]) if found else None

    def check_resumed(self, started: bool) -> None:
        """Fails unless the process resumed from the last checkpoint complete at its launch (or started afresh
        when there was none): what it said, or, if it said nothing, that it had not got that far (`started`:
        it logged a step)."""
        said, want = self.resumed_from(), self.resumes_from or None
        if said != want and (said is not None or started):
            raise Failure(f"the process resumed from {f'step {said}' if said else 'scratch'}, but the last complete "
                          f"checkpoint was {f'step {want}' if want else 'none'}:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log) as f:
            return f.read()[-3000:]


class Failure(Exception):
    pass


def comparable(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def test_a_process_dying_while_it_drops_stale_metrics_lines_loses_none(tmp_path):
    """A resumed run rewrites metrics.jsonl without the lines after its checkpoint. Its writes fail half-way here
    (a file size limit): what a process killed while writing leaves. The file keeps every line; the next resume
    drops the stale ones."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 2.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    limit = len(lines[0]) + 10  # within the second line
    code = ("import resource, signal, sys; from vlm_jax.train.metrics import MetricsLogger; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "MetricsLogger(sys.argv[1], 2, 10)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode != 0 and "File too large" in run.stderr, run.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)
    MetricsLogger(str(tmp_path), 2, 10).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])


def test_a_process_dying_while_it_deletes_an_old_checkpoint_leaves_no_torn_step(tmp_path, monkeypatch):
    """Past keep_checkpoints the oldest checkpoint is deleted after the next one is committed. Deleting its files
    fails half-way here, as a process killed meanwhile stops: every step the directory still lists is whole,
    and the next run's save leaves only the newest checkpoint."""
    state = lambda step: {"step": jnp.int32(step), "params": {"w": jnp.full(64, step, jnp.float32)}, "opt_state": {}}
    abstract = jax.eval_shape(state, 0)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, state(1), {"shard": 1}, "{}")
    ckpt.wait()
    unlink, unlinked = os.unlink, []

    def dying_unlink(*args, **kwargs):
        if len(unlinked) == 2:
            raise OSError("killed")
        unlinked.append(args[0])
        return unlink(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", dying_unlink)
        with pytest.raises(Exception, match="killed"):  # in orbax's finishing thread or in close()
            ckpt.save(2, state(2), {"shard": 2}, "{}")
            ckpt.close()
    assert len(unlinked) == 2  # the deletion began
    ckpt = Checkpointer(str(tmp_path), keep=1)
    steps = ckpt.all_steps()
    complete = skeleton(str(tmp_path / "checkpoints" / str(steps[-1])))
    for step in steps:
        assert skeleton(str(tmp_path / "checkpoints" / str(step))) == complete, f"step {step} is torn"
        assert jax.device_get(ckpt.restore(step, abstract, shardings)[0]["params"]["w"])[0] == step
    ckpt.save(3, state(3), {"shard": 3}, "{}")
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", TRASH]
    assert not os.listdir(tmp_path / "checkpoints" / TRASH)


@pytest.mark.soak
def test_kill_9_at_random_moments_then_resume_ends_as_a_straight_run(tmp_path):
    seed = soak_seed()
    plan = draw_plan(random.Random(seed))
    report = [f"soak seed {seed} (VLM_SOAK_SEED={seed} replays this plan); {STEPS} steps; kills: "
              + ", ".join(f"{k} u={u:.2f}" + (f" at {s}" if s else "") for k, u, s in plan)]
    print(report[0], flush=True)
    # Every process reads the executables the straight run compiled: start-up takes seconds, and no kill lands in
    # jax's writing of a cache entry (not atomic, and jax's concern, not the trainer's).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    straight, soaked = str(tmp_path / "straight"), str(tmp_path / "soaked")
    started = time.monotonic()

    def fail(message: str):
        pytest.fail("\n".join([message] + report), pytrace=False)

    try:
        kills = soak(straight, soaked, plan, env, tmp_path, report)
    except Failure as e:
        fail(str(e))
    report.append(f"{time.monotonic() - started:.0f} s in all")
    print(report[-1], flush=True)
    if sum(saving for _, saving in kills) < 3 or all(startup for startup, _ in kills) or \
            not any(startup for startup, _ in kills):
        fail("the kills did not cover start-up, training and at least three saves in flight")
    want, got = (leftovers(w) for w in (straight, soaked))
    if got != want:
        fail(f"the killed run left {got} in checkpoints/, the straight run {want}")
    if comparable(soaked) != comparable(straight):
        fail(f"metrics.jsonl differs from the straight run's; its steps: {logged_steps(soaked)}")
    config = tiny_config(*RUN)
    setup = loop.Setup(config)
    for step in checkpoint_dirs(straight)[0]:
        states = []
        for workdir in (straight, soaked):
            ckpt = Checkpointer(workdir, config.keep_checkpoints)
            states.append(setup.restored_state(ckpt, step))
            ckpt.close()
        (want_state, want_data), (got_state, got_data) = states
        assert got_data == want_data, f"step {step}: the data-iterator state differs from the straight run's"
        assert_bitwise_equal(want_state, got_state)  # step, parameters, optimizer state


def soak(straight: str, soaked: str, plan: list[tuple[str, float, int]], env: dict, tmp_path,
         report: list[str]) -> list[tuple[bool, bool]]:
    """Runs the command straight into `straight`, then into `soaked` killed by `plan` and rerun after each kill
    until it finishes; appends a line per kill to `report`. Returns (at start-up, with a save in flight) per kill."""
    launches = []

    def launch(workdir: str, log: str) -> Launch:
        launches.append(Launch(workdir, str(tmp_path / log), env))
        return launches[-1]

    try:
        return run_and_kill(straight, soaked, plan, launch, report)
    finally:  # a failure or Ctrl-C leaves no process behind (each runs in its own session)
        for run in launches:
            if run.proc.poll() is None:
                run.kill()


def run_and_kill(straight: str, soaked: str, plan: list[tuple[str, float, int]], launch,
                 report: list[str]) -> list[tuple[bool, bool]]:
    run = launch(straight, "straight.log")
    if run.finish() != 0:
        raise Failure(f"the straight run failed:\n{run.tail()}")
    later = range(3, STEPS + 1)  # steps 1 and 2 compile
    step_time = statistics.median(run.lines[s] - run.lines[s - 1] for s in later)
    save_time = statistics.median(run.committed[s] - run.saving[s] for s in later if s in run.saving)
    report.append(f"straight run: {run.elapsed():.1f} s; a step {step_time:.2f} s, a save {save_time:.2f} s")
    print(report[-1], flush=True)
    complete = skeleton(os.path.join(straight, "checkpoints", str(STEPS)))
    folder = os.path.join(soaked, "checkpoints")
    startup = float("inf")  # the shortest time from a launch to its first step line so far
    kills = []
    for i, (kind, u, step) in enumerate(plan, 1):
        trash_before = trash(soaked)
        run = launch(soaked, f"launch{i}.log")
        target = max(step, run.resumes_from + 1)

        def save_due() -> bool:  # also once the save is committed, if that came between two looks
            began = run.saving.get(target)
            return target in run.committed or (began is not None and run.elapsed() >= began + u * save_time)

        try:
            if kind == "start-up":
                run.wait_for(lambda: run.elapsed() >= u * startup, "the start-up kill")
            elif kind == "step":
                run.wait_for(lambda: target in run.lines, f"step {target}")
                line = run.lines[target]
                run.wait_for(lambda: run.elapsed() >= line + u * step_time, "the mid-step kill")
            else:
                run.wait_for(save_due, f"the save of step {target}")
            when = run.kill()
            run.look()
            saves = [f"save of step {s} ({when - run.saving[s]:.2f} s in, {count_files(os.path.join(folder, name))} "
                     "files written)" for s, name in sorted(run.saves_in_flight().items())]
            committed = checkpoint_dirs(soaked)[0]
            deleting = [f"step {c} moved out to be deleted" + (" (by an earlier launch)" if c in trash_before else "")
                        for c in trash(soaked)]
            last = max(run.lines, default=None)
            phase = "start-up (no step of its own logged)" if last is None else f"after step {last}'s line"
            kills.append((last is None, bool(saves)))
            report.append(f"kill {i} ({kind}, u={u:.2f}): {when:.2f} s after a launch that resumed from step "
                          f"{run.resumes_from}; {phase}; in flight: {', '.join(saves + deleting) or 'no save'}; "
                          f"committed checkpoints left: {committed}")
            print(report[-1], flush=True)
            if torn := torn_steps(soaked, complete):
                raise Failure(f"the kill left committed checkpoints {torn} with files missing")
            run.check_resumed(started=last is not None)
        except Failure as e:
            raise Failure(f"launch {i}: {e}") from None
        if last is not None:
            startup = min(startup, run.lines[min(run.lines)])
    run = launch(soaked, "last.log")
    status = run.finish()
    if status != 0:
        raise Failure(f"the last launch ended with status {status}:\n{run.tail()}")
    run.check_resumed(started=True)
    report.append(f"last launch: resumed from step {run.resumes_from}, finished in {run.elapsed():.1f} s")
    print(report[-1], flush=True)
    return kills
