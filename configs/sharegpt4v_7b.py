"""ShareGPT4V-7B (docs/architectures.md 5.5): `--config configs/sharegpt4v_7b.py:stage1` or `:stage2[,tiny]`.

stage1 ("feature alignment", 1.2 M ShareCaptioner captions, plain template): CLIP layers 12-23 + projector +
the entire LLM at 2e-5; ViT embeddings, pre-norm and layers 0-11 frozen. Global batch 256, 1 epoch.
stage2 (instruction tuning, 665k mix, vicuna_v1 template): projector + LLM at 2e-5, vision tower frozen,
starting from stage 1 (`--config.init_params=STAGE1_WORKDIR`). Global batch 128, 1 epoch.
Both: warmup 3 %, cosine to 0, weight decay 0, max length 2048, 336 px, one image (no tiling), CLIP's resize and
centre crop, stage 2 after a pad to a square.
Scale: v5p:2x2x2 (8 chips), FSDP 8, one pass a step; each stage's per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages
from vlm_jax.data.conversation import VICUNA_V1_SYSTEM

STAGES = ("stage1", "stage2")


def recipe(c: ml_collections.ConfigDict, stage: str, tiny: bool) -> ml_collections.ConfigDict:
    o = c.optim
    o.lr, o.weight_decay, o.schedule, o.final_lr_ratio, o.clip_norm = 2e-5, 0.0, "cosine", 0.0, 1.0
    if stage == "stage1":
        c.batch_size, c.data.template = 256, "plain"
    else:
        c.batch_size, c.data.template = 128, "vicuna_v1"
        c.data.system = VICUNA_V1_SYSTEM
    stages.warmup(c, 0.03)
    # One pass over the data; a batch is 256 (128) packed rows of up to 3 examples, not 256 (128) examples.
    stages.epochs(c, 1)
    c.data.update(seq_len=2048, tile_size=c.model.vision.image_size, max_tiles=1, max_tiles_per_row=3)
    # CLIP-336's processor (shortest edge to 336, bicubic, centre crop); stage 2 pads to a square with the mean
    # colour first (--image_aspect_ratio pad), stage 1 does not (the script leaves it at "square").
    c.data.update(image_resize="shortest_edge_crop", image_pad_square=stage == "stage2")
    if tiny:
        stages.make_tiny(c, image_size=32)
    if stage == "stage1":
        # ViT blocks from half the depth up (12-23 of 24; the last is unused at feature_layer -2).
        top = f"{c.model.vision.depth // 2}:"
        o.trainable = [("vision/layers/.*", "vision_top", top), ("vision/.*", "frozen"), (".*", "train")]
    else:
        o.trainable = [("vision/.*", "frozen"), (".*", "train")]
    return c


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    return recipe(stages.system("sharegpt4v_7b"), stage, tiny)
