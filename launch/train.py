"""Train a VLM (the vlm-train command): python launch/train.py --config configs/demo.py --workdir W

The command lives in vlm_jax/cli/train.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.train import main

if __name__ == "__main__":
    main()
