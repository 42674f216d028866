"""The command line every vlm_jax command shares: --config FILE[:ARG], --config.KEY=VALUE overrides, --workdir,
and the multi-process flags of the commands that run on devices."""

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping

import ml_collections

from configs import base
from vlm_jax.config import check_values, load_config
from vlm_jax.errors import ReportedError


def _count(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ.get(key, "1"))
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not a count") from None


def cluster_description(environ: Mapping[str, str], tpu_vm: bool = False) -> str | None:
    """The multi-process job this process is one of, as `jax.distributed.initialize()` with no arguments finds it
    from `environ` (the variables jax/_src/clusters reads, checked in its order: the first job kind present
    decides), or None when there is no such job or it has one process: an Open MPI job, a SLURM step, a TPU
    slice whose hosts are listed (GKE), or TPU slices joined by Multislice. On a Cloud TPU VM (`tpu_vm`: TPU chips
    on this host) the hosts of the slice are in its metadata server, which jax asks: every TPU VM initializes
    (one host makes a job of one process)."""
    if "OMPI_MCA_orte_hnp_uri" in environ:
        n = _count(environ, "OMPI_COMM_WORLD_SIZE")
        return f"Open MPI job of {n} processes" if n > 1 else None
    if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                  "SLURM_LOCALID")):
        n = _count(environ, "SLURM_NTASKS")
        return f"SLURM job {environ['SLURM_JOB_ID']} of {n} tasks" if n > 1 else None
    hosts = environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES", ""))
    slices = _count(environ, "MEGASCALE_NUM_SLICES")
    if hosts.count(",") or slices > 1:
        return f"TPU job of {slices} slice(s), {hosts.count(',') + 1} host(s) each"
    return "Cloud TPU VM (its hosts from the metadata server)" if tpu_vm else None


def tpu_chips_here() -> int:
    """TPU chips attached to this host (PCI devices), as jax's own TPU VM detection counts them."""
    from jax._src import hardware_utils  # jax's PCI scan; no public name in jax 0.10

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


Arguments = Callable[[argparse.ArgumentParser], None]


def _add_shared(parser: argparse.ArgumentParser, workdir: bool, distributed: bool, config_optional: bool) -> None:
    if config_optional:  # a command that needs only a mesh and the model defaults runs with configs/base.py
        parser.add_argument("--config", default=None,
                            help="config file, optionally FILE:ARG (default: configs/base.py)")
    else:
        parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG")
    if workdir:
        parser.add_argument("--workdir", required=True)
    if distributed:
        parser.add_argument("--coordinator_address", default="",
                            help="multi-process runs: host:port of process 0 (also needs the two below); without it "
                                 "a SLURM, Open MPI or TPU job of several processes sets itself up from its environment")
        parser.add_argument("--num_processes", type=int, default=1)
        parser.add_argument("--process_id", type=int, default=0)


def parse(description: str, argv: list[str] | None = None, add_arguments: Arguments | None = None, *,
          workdir: bool = True, distributed: bool = True, config_optional: bool = False,
          commands: Mapping[str, tuple[str, Arguments]] | None = None,
          ) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Returns (args, config). Every `--config.a.b=v` (or `--config.a.b v`) is applied as an override.

    `config_optional` makes --config default to configs/base.py (commands that need only a mesh and model
    defaults; `args.config` stays None); `args.overrides` keeps the overrides as given (KEY=VALUE). `commands`
    (name -> (help, add_arguments)) makes one subcommand each, with the shared flags after
    its name; `args.command` is the one chosen. With `distributed` (commands that run on devices) the
    multi-process flags are taken and jax.distributed set up; without, jax is not imported (plan chooses its
    devices first)."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments:
        add_arguments(parser)
    if commands:
        sub = parser.add_subparsers(dest="command", required=True)
        for name, (help_text, add) in commands.items():
            command = sub.add_parser(name, help=help_text, description=help_text)
            add(command)
            _add_shared(command, workdir, distributed, config_optional)
    else:
        _add_shared(parser, workdir, distributed, config_optional)
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}")
        item = item[len("--config."):]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"--config.{item} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    args.overrides = overrides
    try:
        config = load_config(args.config or base.__file__, overrides)
        if distributed:  # plan checks once its devices are set up, which must happen before jax is imported
            check_values(config)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(e.args[0] if isinstance(e, KeyError) else str(e))  # a KeyError's str() adds quotes
    # force: absl (orbax logs through it at import) has already given the root logger a WARNING-level handler,
    # which would make this call do nothing and hide every INFO line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's several INFO lines per checkpoint, through absl
    if not distributed:
        return args, config
    if args.coordinator_address:
        import jax
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        return args, config
    if (args.num_processes, args.process_id) != (1, 0):
        parser.error("--num_processes and --process_id need --coordinator_address")
    try:
        cluster = cluster_description(os.environ, tpu_vm=tpu_chips_here() > 0)
    except ValueError as e:
        parser.error(str(e))
    if cluster:  # jax's own detection reads the same variables and fills in every argument
        import jax
        logging.info("multi-process run: %s", cluster)
        jax.distributed.initialize()
    return args, config


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Runs a command's body, turning a ReportedError (bad input, a diverged run: its message is the whole report)
    into one `error: ...` line on stderr and exit status 1; any other exception keeps its traceback."""
    try:
        yield
    except ReportedError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
