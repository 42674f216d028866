"""Average checkpoints into one (the vlm-soup command): python launch/soup.py --src A --src B --dst SOUP

The command lives in vlm_jax/cli/soup.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.soup import main

if __name__ == "__main__":
    main()
