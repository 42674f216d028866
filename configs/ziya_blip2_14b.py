"""Ziya-BLIP2-14B-Visual-v1 (docs/architectures.md 3): `--config configs/ziya_blip2_14b.py:stage1` or `:stage2[,tiny]`.

EVA ViT-g/14 (39 blocks, post_layernorm over all 257 tokens) -> BLIP-2 Q-Former (32 queries, 12 layers,
cross-attention every second layer) -> `language_projection` Linear(768, 5120) -> Ziya-LLaMA-13B-v1.
Each image is one 224 px view (BlipImageProcessor: straight bicubic resize, no tiles: data.max_tiles=1)
and takes 32 placeholder slots where its `<image>` marker stands; several images per dialogue.

stage1 (image-caption alignment) and stage2 (image QA / instructions): the projection only
(`connector/projection`); ViT, Q-Former (queries included) and LLM frozen in both.
Learning rates, batch and steps are not published: the values here follow BLIP-2's (LAVIS) stage-2
pre-training (1e-4 cosine to 1e-5, weight decay 0.05) for stage 1 and a tenth of that for stage 2, one epoch of
the given data (data.epochs), to be tuned.
Import the weights with `launch/convert.py import` (HF Blip2ForConditionalGeneration layout) and start from
them with `--config.init_params=CKPT_DIR`.
Scale: v5p:2x2x1 (a v5p-8: 4 chips), FSDP 4, 4 micro-batches; the per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages

STAGES = ("stage1", "stage2")


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = stages.system("ziya_blip2_14b")
    c.batch_size = 256
    stages.epochs(c, 1)
    c.micro_batches = 4  # 16 rows per chip at a time on a v5p-8 (docs/scale.md)
    c.data.update(template="ziya", seq_len=2048, tile_size=224, max_tiles=1, max_tiles_per_row=16,
                  swap_hw=False)
    c.data.system = ""  # Ziya's chat() writes no system text (`prompt_prefix ""`, docs/architectures.md 3.5)
    o = c.optim
    o.schedule, o.clip_norm, o.weight_decay = "cosine", 1.0, 0.05
    o.lr, o.final_lr_ratio = (1e-4, 0.1) if stage == "stage1" else (1e-5, 0.1)
    o.trainable = [("connector/projection/.*", "projection"), (".*", "frozen")]
    stages.warmup(c, 0.03)
    if tiny:
        stages.make_tiny(c, image_size=32)
    return c
