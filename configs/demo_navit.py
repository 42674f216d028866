"""The demo's NaViT variant: the same synthetic data and tiny decoder as configs/demo.py, but every image enters
at its native resolution through a Qwen2-VL-style NaViT tower (2-D RoPE, images of a row packed into one patch
sequence with segment ids) and the PatchMerger (one token per 2x2 patch window), as POINTS1.5 does.

8 px patches (16 px merge windows): a 32-80 px synthetic image becomes 2x2 to 5x5 visual tokens.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    m = c.model
    width = m.vision.width
    m.vision.update(stem="navit", patch_size=8, temporal_patch_size=2, rope_base=1e4,
                    mlp_act="quick_gelu", norm_eps=1e-6, pre_norm=False, post_norm=False, qkv_bias="qkv",
                    feature_layer=-1, drop_cls=False)
    m.connector.update(kind="mlp", in_norm=True, norm_eps=1e-6, merge_size=2, hidden_dim=4 * width)

    d = c.data
    # Native resolution: the smallest synthetic image (32 px) is 2x2 windows, the largest (80 px) 5x5.
    d.min_pixels, d.max_pixels = 32 * 32, 80 * 80
    # Rows planned over windows of 256 examples leave far fewer token and patch slots empty than rows filled in
    # stream order (docs/experiments.md 2).
    d.max_patches_per_row = 144
    d.max_images_per_row = 8
    d.pack_window = 256
    # Stage 0 on packed rows of native-resolution images: 32 rows of 144 slots hold about 64 images a step. A
    # shape spans several merge windows here, so the tower needs the long stage 0 before the VLM's colour and
    # shape answers (both find an object by its shape) can rely on it (docs/experiments.md 2).
    c.vision_pretrain.update(batch_size=32, steps=1000)
    c.total_steps = 1600
    return c
