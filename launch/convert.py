"""PyTorch <-> vlm_jax checkpoints (the vlm-convert command): python launch/convert.py import|export|check ...

The command lives in vlm_jax/cli/convert.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.convert import main

if __name__ == "__main__":
    main()
