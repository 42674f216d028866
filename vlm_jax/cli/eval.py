"""Evaluate the latest checkpoint on held-out questions:
vlm-eval --config configs/demo.py --workdir W [--step N | --params CKPT_DIR]

--params evaluates a checkpoint directory (an import or a soup) instead of W's checkpoints. What is evaluated (W, or
the --params directory) stands in for init_params, so with data.image_processor="auto" the image processor is the
one recorded with it (the one W's run used, or the import's preprocessor_config.json), and without data.tokenizer
so is the tokenizer.

Prints one JSON line with `accuracy` and `accuracy_by_type`; writes W/eval_predictions.jsonl and
W/eval_examples.png.
"""

import json
import os

from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.data.tokenizer import run_tokenizer
from vlm_jax.evaluate import evaluate, plot_examples
from vlm_jax.train.loop import Setup


def main(argv: list[str] | None = None) -> None:
    def add_arguments(p):
        p.add_argument("--step", type=int, default=None, help="checkpoint step to evaluate (default: the latest)")
        p.add_argument("--params", default=None, help="evaluate this checkpoint directory instead")

    args, config = parse(__doc__.splitlines()[0], argv, add_arguments)
    with reported_errors():
        setup = Setup(config)
        config.init_params = args.params or args.workdir  # where the recorded tokenizer and image processor come from
        if args.params:
            state, step = setup.imported_state(args.params), args.params
        else:
            ckpt = Checkpointer(args.workdir, config.keep_checkpoints)
            step = ckpt.latest_step() if args.step is None else args.step
            if step not in ckpt.all_steps():
                raise SystemExit(f"no checkpoint {'' if step is None else step} in "
                                 f"{os.path.join(args.workdir, 'checkpoints')} (have {ckpt.all_steps()})")
            state, _ = setup.restored_state(ckpt, step)
            ckpt.close()
        os.makedirs(args.workdir, exist_ok=True)
        tokenizer = run_tokenizer(config)
        scores, records = evaluate(config, state.params, tokenizer, setup.mesh)
        with open(os.path.join(args.workdir, "eval_predictions.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n")
        plot_examples(records, os.path.join(args.workdir, "eval_examples.png"))
        print(json.dumps({"step": step, **scores}), flush=True)


if __name__ == "__main__":
    main()
