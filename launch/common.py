"""Command-line handling shared by the launch scripts: --config FILE, --workdir, --config.KEY=VALUE."""

import argparse
import logging
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_jax.config import load_config  # noqa: E402


def parse(description: str, argv: list[str] | None = None,
          add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, workdir: bool = True):
    """Returns (args, config). Every `--config.a.b=v` (or `--config.a.b v`) is applied as an override."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG")
    if workdir:
        parser.add_argument("--workdir", required=True)
    parser.add_argument("--coordinator_address", default="",
                        help="multi-process runs: host:port of process 0 (also needs the two below)")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
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
    try:
        config = load_config(args.config, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e).strip("\"'"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.coordinator_address:
        import jax
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return args, config
