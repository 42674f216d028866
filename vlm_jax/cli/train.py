"""Train a VLM: vlm-train --config configs/demo.py --workdir W [--config.KEY=VALUE ...]

Rerunning the same command in the same workdir resumes from its latest checkpoint. A config with
vision_pretrain.steps > 0 (the demo's) first trains its vision tower alone (stage 0) and starts from it.
"""

from vlm_jax.cli.args import parse
from vlm_jax.demo.stages import train_demo
from vlm_jax.train.loop import train


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv)
    if config.vision_pretrain.steps > 0:
        train_demo(config, args.workdir)
    else:
        train(config, args.workdir)


if __name__ == "__main__":
    main()
