"""Belle-VL (docs/architectures.md 4): `--config configs/belle_vl.py:stage1` or `:stage2[,tiny]`.

Qwen-VL's ViT-bigG/14 (48 blocks, 16x16 position table) -> cross-attention resampler (256 queries, 2-D
sin-cos, width 5120, 40 heads) + ln_post + proj -> Qwen-14B (Qwen1 layout, imported as family qwen_vl /
qwen1). Each image is one view resized straight to the stage's resolution (data.max_tiles=1) and becomes
"Picture k: <img>" + 256 placeholder slots + "</img>" where its `<image>` marker stands (template qwen_vl).

stage1 (multimodal pre-training) at 224 px (16x16 patches: the position table as is): the resampler
(queries, kv_proj, attention, ln_q/ln_kv, ln_post, proj); ViT and LLM frozen.
stage2 (instruction tuning) at 448 px (32x32 patches: the ViT's position table and the resampler's key
positions are re-interpolated bicubically at run time): resampler + LLM; ViT frozen.
The sin-cos table `connector/pos_embed` is fixed in both. Learning rates, batch and steps are not
published: the values are Qwen-VL's own (pre-training 2e-4, instruction tuning 1e-5, weight decay 0.05 / 0.1,
cosine), unverified for Belle-VL, over one epoch of the given data (data.epochs), to be tuned.
Scale: v5p:2x2x2 (8 chips), FSDP 8, 2 micro-batches; each stage's per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages

STAGES = ("stage1", "stage2")
FIXED = ("connector/pos_embed", "frozen")  # the 2-D sin-cos table: stored as a parameter, never trained


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = stages.system("belle_vl")
    size = 224 if stage == "stage1" else 448
    c.batch_size = 256
    stages.epochs(c, 1)
    c.micro_batches = 2  # 16 rows per chip at a time on v5p:2x2x2 (docs/scale.md)
    c.data.update(template="qwen_vl", system="You are a helpful assistant.", seq_len=2048, tile_size=size,
                  max_tiles=1, max_tiles_per_row=4, swap_hw=False)
    c.model.vision.image_size = size
    o = c.optim
    o.schedule, o.final_lr_ratio, o.clip_norm = "cosine", 0.0, 1.0
    if stage == "stage1":
        o.lr, o.weight_decay = 2e-4, 0.05
        o.trainable = [FIXED, ("connector/.*", "resampler"), (".*", "frozen")]
    else:
        o.lr, o.weight_decay = 1e-5, 0.1
        o.trainable = [FIXED, ("connector/.*", "resampler"), ("decoder/.*", "llm"), (".*", "frozen")]
    stages.warmup(c, 0.03)
    if tiny:
        # 16 px patches in both stages, so stage 2's 64 px tiles (4x4) re-interpolate the 2x2 table.
        stages.make_tiny(c, image_size=32 if stage == "stage1" else 64)
        c.model.vision.patch_size = 16
    return c
