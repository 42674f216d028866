"""Check a run's data before training (the vlm-check-data command): python launch/check_data.py --config C

The command lives in vlm_jax/cli/check_data.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.check_data import main

if __name__ == "__main__":
    main()
