"""Convert LLaVA-format data to array_record shards (the vlm-prepare-data command):
python launch/prepare_data.py --src FILE.json|FILE.jsonl --dst OUT [--image_folder DIR] [--shards N] [--config C]

The command lives in vlm_jax/cli/prepare_data.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.prepare_data import main

if __name__ == "__main__":
    main()
