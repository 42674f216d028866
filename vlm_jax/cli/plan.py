"""Plan a train step ahead of time: vlm-plan --config configs/X.py:STAGE --topology v5p:2x2x2

Compiles the real train step for a TPU topology (through libtpu: pip install -r requirements-plan.txt; no TPU
needed) or for this host's CPU devices (`cpu:N`), allocating no weights, and prints one JSON line: the mesh,
parameter counts, tokens per step, per-chip memory (arguments, outputs, temporaries, peak, the chip's HBM and
whether the peak fits), analytic model FLOPs per step and the compile time. `--config.KEY=VALUE` overrides apply.
"""

import json
import os
import sys

from vlm_jax.cli.args import parse


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--topology", required=True, help="cpu:N, or a TPU topology: v5p:2x2x2, v5e:4x4, v6e:4x4, v4:2x2x1, ..."),
        workdir=False, distributed=False)
    kind, _, count = args.topology.partition(":")
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the topology's devices could be set up")
    if kind == "cpu" and count.isdigit():
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={count}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing runs: the CPU is only the host of the compile

    from vlm_jax import parallel
    from vlm_jax.train.plan import plan

    try:  # a bad topology name, or a mesh or batch the devices do not divide: one line
        report = plan(config, parallel.topology_devices(args.topology))
    except ValueError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: {e}")
    print(json.dumps(dict(config=args.config, topology=args.topology, **report)), flush=True)


if __name__ == "__main__":
    main()
