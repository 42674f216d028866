"""Evaluate the latest checkpoint on held-out questions:
python launch/eval.py --config configs/demo.py --workdir W

Prints one JSON line with `accuracy` and `accuracy_by_type`; writes W/eval_predictions.jsonl and
W/eval_examples.png.
"""

import json
import os

from common import parse

from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.evaluate import evaluate, plot_examples
from vlm_jax.train.checkpoint import Checkpointer
from vlm_jax.train.loop import Setup


def main() -> None:
    args, config = parse(__doc__.splitlines()[0])
    setup = Setup(config)
    ckpt = Checkpointer(args.workdir, config.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        raise SystemExit(f"no checkpoint in {os.path.join(args.workdir, 'checkpoints')}: train first")
    state, _ = ckpt.restore(step, setup.abstract_state, setup.state_shardings)
    ckpt.close()
    tokenizer = load_tokenizer(config.data.tokenizer)
    scores, records = evaluate(config, state.params, tokenizer, setup.mesh)
    with open(os.path.join(args.workdir, "eval_predictions.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n")
    plot_examples(records, os.path.join(args.workdir, "eval_examples.png"))
    print(json.dumps({"step": step, **scores}), flush=True)


if __name__ == "__main__":
    main()
