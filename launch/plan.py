"""Plan a train step ahead of time (the vlm-plan command): python launch/plan.py --config C --topology T

The command lives in vlm_jax/cli/plan.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.plan import main

if __name__ == "__main__":
    main()
