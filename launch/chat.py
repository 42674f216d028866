"""Talk to a trained model (the vlm-chat command): python launch/chat.py --workdir W --image IMG "question"

The command lives in vlm_jax/cli/chat.py (`--help` lists its flags); it needs the package installed
(`pip install -e .`)."""

from vlm_jax.cli.chat import main

if __name__ == "__main__":
    main()
