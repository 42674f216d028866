"""POINTS1.5-7B (docs/architectures.md 2): `--config configs/points15_7b.py:stage1` or `:stage2[,tiny]`.

Model at its real size: Qwen2-VL's NaViT tower (native resolution, 2-D RoPE, images packed per row), the
PatchMerger projector (one token per 2x2 patch window) and Qwen2.5-7B (GQA 28/4, qkv bias, 1-D RoPE).
Batches are the NaViT contract (docs/contracts.md): rows of 4096 tokens in groups of 4 sharing their vision rows of
11672 patch slots, packed (bench/packing.py measures the padding of these shapes).

stage1 (pre-training, ~2 M captions): projector only at 2e-4, weight decay 0.
stage2 (visual instruction tuning): projector + LLM at 2e-5, weight decay 0.1, from stage 1.
Both: vision encoder frozen, batch 32, context 4096, grad-clip 1.0, cosine, one epoch (data.epochs; the paper
gives data sizes in examples and tokens, not steps). Then a uniform model soup of
several stage-2 runs: `launch/soup.py --src RUN_A --src RUN_B --dst SOUP`.
Scale: v5p:2x2x2 (8 chips), FSDP 8, one group of 4 rows a chip; each stage's per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages

STAGES = ("stage1", "stage2")


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = stages.system("points15_7b")
    c.batch_size = 32  # packed rows (in groups of 4), each holding several examples
    # WePOINTS' processor defaults (min 56x56, max 1280 merged tokens an image). 11672 patch slots a row are the
    # patches per token of bench/packing.py's LLaVA-665k-like mix; groups of 4 rows sharing their vision rows pad
    # far less there than rows with their own images (docs/experiments.md 3), and need batch_size 32 on
    # at most 8 devices of the batch axes. A window holds its examples' float32 patches, ~14 MB an average example.
    stages.epochs(c, 1)
    c.data.update(template="qwen2_vl", seq_len=4096, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                  max_patches_per_row=11672, max_images_per_row=16, pack_window=512, vision_group_rows=4)
    c.data.system = ""  # POINTS' chat template has no system message (docs/architectures.md 2.6)
    o = c.optim
    o.schedule, o.final_lr_ratio, o.clip_norm = "cosine", 0.0, 1.0
    if stage == "stage1":
        o.lr, o.weight_decay = 2e-4, 0.0
        o.trainable = [("connector/.*", "connector"), (".*", "frozen")]
    else:
        o.lr, o.weight_decay = 2e-5, 0.1
        o.trainable = [("vision/.*", "frozen"), (".*", "train")]
    stages.warmup(c, 0.03)
    if tiny:
        stages.make_tiny(c, image_size=32)
    return c
