"""Train a VLM: vlm-train --config configs/demo.py --workdir W [--config.KEY=VALUE ...]

Rerunning the same command in the same workdir resumes from its latest checkpoint. A config with
vision_pretrain.steps > 0 (the demo's) first trains its vision tower alone (stage 0) and starts from it.
SIGTERM or Ctrl-C, or --stop_at N, ends the run after a step with a checkpoint there and exit status 0.
--profile_steps A:B writes a profiler trace of steps A to B into WORKDIR/profile.
"""

import argparse

from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.demo.stages import train_demo
from vlm_jax.train.loop import train


def step_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number (1 or more)")
    return int(text)


def step_range(text: str) -> tuple[int, int]:
    first, colon, last = text.partition(":")
    if not (colon and first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a range of steps A:B with 1 <= A <= B")
    return int(first), int(last)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stop_at", type=step_number, default=None, metavar="N",
                        help="stop after step N with a checkpoint, as a preemption would, keeping the schedule of "
                             "total_steps; rerunning without it resumes from there")
    parser.add_argument("--profile_steps", type=step_range, default=None, metavar="A:B",
                        help="write a jax profiler trace of steps A to B (of the VLM stage) into WORKDIR/profile, "
                             "for TensorBoard's profile tab and ui.perfetto.dev; every process traces its own "
                             "devices; a run resumed past B traces nothing")


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv, add_arguments)
    with reported_errors():
        if config.vision_pretrain.steps > 0:
            train_demo(config, args.workdir, args.stop_at, args.profile_steps)
        else:
            train(config, args.workdir, args.stop_at, args.profile_steps)


if __name__ == "__main__":
    main()
