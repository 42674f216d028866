"""Average checkpoints of one model into a new checkpoint directory (model soup):

  python launch/soup.py --src RUN_A --src RUN_B@1200 --src CKPT_DIR [--weights 1,1,2] --dst SOUP_DIR

Each --src is a training workdir (its latest checkpoint, or WORKDIR@STEP) or a checkpoint directory (from
`convert.py import` or an earlier soup). The sources must share parameter paths, shapes and dtypes.
SOUP_DIR starts training with --config.init_params=SOUP_DIR, evaluates with `launch/eval.py --params
SOUP_DIR`, and exports with `launch/convert.py export --src SOUP_DIR`. Prints one JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import get_config  # noqa: E402
from vlm_jax import parallel  # noqa: E402
from vlm_jax.soup import soup  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", required=True, help="workdir[@step] or checkpoint directory")
    parser.add_argument("--dst", required=True)
    parser.add_argument("--weights", default=None, help="comma-separated, one per --src (default: uniform)")
    args = parser.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    mesh = parallel.make_mesh(get_config().mesh)
    try:
        meta = soup(args.src, args.dst, mesh, weights)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"dst": args.dst, **meta["soup"]}), flush=True)


if __name__ == "__main__":
    main()
