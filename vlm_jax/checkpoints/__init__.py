"""Checkpoint storage that the trainer and interop share, and that imports neither: train-state checkpoints of
a workdir (train_state.py), parameter-only checkpoints (params_only.py), streamed writes and in-place reads
(streaming.py), the checkpoint directory that import writes and export, soup and `init_params` read
(directory.py), and reading a workdir's parameters (workdir.py). Saved configs are brought up to date by
vlm_jax/config.py's upgrade_config."""
