"""Average checkpoints of one model into a new checkpoint directory (model soup):

  vlm-soup --src RUN_A --src RUN_B@1200 --src CKPT_DIR [--weights 1,1,2] --dst SOUP_DIR [--config FILE]

Each --src is a training workdir (its latest checkpoint, or WORKDIR@STEP) or a checkpoint directory (from
`vlm-convert import` or an earlier soup). The sources must share parameter paths, shapes and dtypes; the
config's mesh (configs/base.py's by default) holds them while they are averaged. SOUP_DIR starts training with
--config.init_params=SOUP_DIR, evaluates with `vlm-eval --params SOUP_DIR`, and exports with
`vlm-convert export --src SOUP_DIR`. Prints one JSON line.
"""

import json

from vlm_jax import parallel
from vlm_jax.cli.args import parse
from vlm_jax.soup import soup


def main(argv: list[str] | None = None) -> None:
    def add_arguments(p):
        p.add_argument("--src", action="append", required=True, help="workdir[@step] or checkpoint directory")
        p.add_argument("--dst", required=True)
        p.add_argument("--weights", default=None, help="comma-separated, one per --src (default: uniform)")

    args, config = parse(__doc__.splitlines()[0], argv, add_arguments, workdir=False, config_optional=True)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    mesh = parallel.make_mesh(config.mesh)
    try:
        meta = soup(args.src, args.dst, mesh, weights)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"dst": args.dst, **meta["soup"]}), flush=True)


if __name__ == "__main__":
    main()
