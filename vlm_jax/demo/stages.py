"""The demo's two stages in one workdir: stage 0 trains the vision tower alone into WORKDIR/vision_pretrain, then
`train()` trains the VLM starting from that tower (config.init_params)."""

import os

import ml_collections

from vlm_jax.checkpoints.train_state import Checkpointer
from vlm_jax.demo.vision_pretrain import pretrain_vision
from vlm_jax.train.loop import train
from vlm_jax.train.step import TrainState


def train_demo(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None,
               profile_steps: tuple[int, int] | None = None) -> TrainState:
    """Stage 0 (`config.vision_pretrain`), then `train(config, workdir, stop_at, profile_steps)` from its tower
    (the steps to profile are the VLM stage's). Stage 0 runs once in a workdir: not again once its tower is saved,
    nor once the VLM stage has a checkpoint to resume from."""
    if config.init_params:
        raise ValueError(f"init_params={config.init_params!r} and vision_pretrain.steps="
                         f"{config.vision_pretrain.steps} both set: start from one or the other")
    stage0 = os.path.join(workdir, "vision_pretrain")
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    resuming = ckpt.latest_step() is not None
    ckpt.close()
    if not resuming:
        pretrain_vision(config, stage0)
    config = config.copy_and_resolve_references()
    config.init_params = stage0
    return train(config, workdir, stop_at, profile_steps)
