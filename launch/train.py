"""Train a VLM: python launch/train.py --config configs/demo.py --workdir W [--config.KEY=VALUE ...]

Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""

from common import parse

from vlm_jax.train.loop import train


def main() -> None:
    args, config = parse(__doc__.splitlines()[0])
    train(config, args.workdir)


if __name__ == "__main__":
    main()
