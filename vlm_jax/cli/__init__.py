"""The vlm-train, vlm-eval, vlm-convert, vlm-plan and vlm-soup commands (pyproject.toml's entry points; the
scripts in launch/ run the same `main`), all on the command line of `args.parse`."""
