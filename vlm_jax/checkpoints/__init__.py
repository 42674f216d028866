"""Checkpoint storage that the trainer and interop share, and that imports neither: train-state checkpoints of
a workdir (train_state.py), parameter-only checkpoints (params_only.py), streamed writes and in-place reads
(streaming.py), the checkpoint directory that import writes and export, soup and `init_params` read
(directory.py), reading a workdir's parameters (workdir.py) and its saved configs (saved_config.py)."""
