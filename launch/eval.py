"""Evaluate a checkpoint (the vlm-eval command): python launch/eval.py --config configs/demo.py --workdir W

The command lives in vlm_jax/cli/eval.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.eval import main

if __name__ == "__main__":
    main()
