"""POINTS1.5-7B (ARCHITECTURES.md 2.7): `--config configs/points15_7b.py:stage1` or `:stage2[,tiny]`.

stage1 (pre-training, ~2 M captions): projector only at 2e-4, weight decay 0.
stage2 (visual instruction tuning): projector + LLM at 2e-5, weight decay 0.1, from stage 1.
Both: vision encoder frozen, batch 32, context 4096, grad-clip 1.0, cosine. Then a uniform model soup of
several stage-2 runs: `launch/soup.py --src RUN_A --src RUN_B --dst SOUP`.

The LLM is Qwen2.5-7B at its real size (qkv bias, GQA). POINTS' Qwen2-VL NaViT encoder and PatchMerger
projector exist (`vision.stem="navit"`, connector `merge_size=2`; interop/qwen2_vl.py `model_config` gives
their real-size values) but the trainer still feeds tiles, not packed patches: until the NaViT packer
lands this config puts a CLIP ViT-L/14-224 and the MLP projector in their place, so the recipe (groups,
rates, decay) runs now.
"""

import ml_collections

from configs import sizes, stages

STAGES = ("stage1", "stage2")


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = sizes.get_config("text:qwen2_5_7b")
    c.model.vision.update(sizes.VISION["clip_l14_224"])  # stand-in for the NaViT encoder (see above)
    c.data.source = "llava_json"
    c.batch_size, c.total_steps = 32, 2_000_000 // 32
    c.data.update(template="chatml", seq_len=4096, tile_size=224, max_tiles=9, max_tiles_per_row=15,
                  swap_hw=False)
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
