"""Real model sizes of the LLaVA-family systems: `--config configs/sizes.py:NAME`.

NAME is a system (vision + connector + LLM) or an LLM alone (`text:NAME`, e.g. `text:qwen2_5_7b`).
Values from docs/architectures.md sections 1, 2.2-2.5, 3, 4, 5 and 7.
"""

import ml_collections

from configs import base

VISION = {
    "clip_l14_224": dict(stem="clip", image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                         mlp_dim=4096, mlp_act="quick_gelu", norm_eps=1e-5, pre_norm=True,
                         feature_layer=-2, drop_cls=True),
}
VISION["clip_l14_336"] = VISION["clip_l14_224"] | dict(image_size=336)
# BLIP-2's EVA ViT-g/14 (HF Blip2VisionConfig defaults): all 39 blocks, post_layernorm over all 257 tokens.
# Qwen2-VL-7B's NaViT tower as POINTS1.5 uses it (docs/architectures.md 2.2): packed native-resolution patches, 2-D
# RoPE, no final norm (the last block's output goes to the PatchMerger).
VISION["qwen2_vl_navit"] = dict(stem="navit", patch_size=14, temporal_patch_size=2, width=1280, depth=32,
                                heads=16, mlp_dim=5120, mlp_act="quick_gelu", norm_eps=1e-6, rope_base=1e4,
                                pre_norm=False, post_norm=False, qkv_bias="qkv", feature_layer=-1, drop_cls=False)
VISION["eva_vit_g_224"] = dict(stem="eva", image_size=224, patch_size=14, width=1408, depth=39, heads=16,
                               mlp_dim=6144, mlp_act="gelu", norm_eps=1e-6, pre_norm=False, feature_layer=-1,
                               drop_cls=False, qkv_bias="qv", post_norm=True)
# Qwen-VL's ViT-bigG/14 (Belle-VL): 48 blocks, mlp int(1664 * 4.9231), a 16x16 position table; 448 px.
VISION["qwen_vit_bigg_448"] = dict(stem="qwenvl", image_size=448, patch_size=14, width=1664, depth=48, heads=16,
                                   mlp_dim=8192, mlp_act="gelu", norm_eps=1e-6, pre_norm=True, feature_layer=-1,
                                   drop_cls=False, qkv_bias="qkv", post_norm=False, pos_grid=16)

CONNECTORS = {
    "mlp": dict(kind="mlp", in_norm=False),
    "mlp_ln": dict(kind="mlp", in_norm=True),  # XVERSE-V: ln_vision before llama_proj
    # Qwen2-VL PatchMerger (POINTS1.5's vision_projector, 2.3): ln_q, 2x2 windows concatenated, 5120 -> 5120 -> LLM.
    "patch_merger": dict(kind="mlp", in_norm=True, norm_eps=1e-6, merge_size=2, hidden_dim=4 * 1280),
    # BLIP-2 Q-Former (Blip2QFormerConfig defaults) + language_projection: 32 tokens per image.
    "qformer_32": dict(kind="qformer", num_queries=32, width=768, layers=12, heads=12, mlp_dim=3072,
                       cross_attention_frequency=2, norm_eps=1e-12),
    # Qwen-VL's resampler at Belle-VL's width 5120 (40 heads of 128) + ln_post + proj: 256 tokens per image.
    "resampler_256": dict(kind="resampler", num_queries=256, heads=40, norm_eps=1e-6),
}

_LLAMA = dict(qkv_bias=False, tie_embeddings=False, rope_base=10000.0)
TEXT = {
    "vicuna_7b": _LLAMA | dict(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
                               ffn=11008, rms_eps=1e-5),
    "vicuna_13b": _LLAMA | dict(vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128,
                                ffn=13824, rms_eps=1e-5),
    "xverse_13b": _LLAMA | dict(vocab_size=100534, hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128,
                                ffn=13824, rms_eps=1e-6),
    "ziya_llama_13b": _LLAMA | dict(vocab_size=39424, hidden=5120, layers=40, heads=40, kv_heads=40,
                                    head_dim=128, ffn=13824, rms_eps=1e-6),
    # Qwen-14B (Qwen1; Belle-VL): the Qwen2 computation with kv heads = heads, ffn = intermediate_size / 2.
    "qwen_14b": dict(vocab_size=152064, hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, ffn=13696,
                     rms_eps=1e-6, rope_base=10000.0, qkv_bias=True, tie_embeddings=False),
    # POINTS1.5's LLM (eps from POINTS' config, not Qwen2.5's 1e-6).
    "qwen2_5_7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, ffn=18944,
                       rms_eps=1e-5, rope_base=1e6, qkv_bias=True, tie_embeddings=False),
}

SYSTEMS = {
    "sharegpt4v_7b": ("clip_l14_336", "mlp", "vicuna_7b"),
    "sharegpt4v_13b": ("clip_l14_336", "mlp", "vicuna_13b"),
    "xverse_v_13b": ("clip_l14_224", "mlp_ln", "xverse_13b"),
    "ziya_blip2_14b": ("eva_vit_g_224", "qformer_32", "ziya_llama_13b"),
    "points15_7b": ("qwen2_vl_navit", "patch_merger", "qwen2_5_7b"),
    "belle_vl": ("qwen_vit_bigg_448", "resampler_256", "qwen_14b"),
}


def get_config(name: str = "sharegpt4v_7b") -> ml_collections.ConfigDict:
    c = base.get_config()
    kind, _, key = name.rpartition(":")
    table = TEXT if kind == "text" else SYSTEMS
    if key not in table:
        raise ValueError(f"unknown size {name!r}; choose from {sorted(SYSTEMS)} or text:{sorted(TEXT)}")
    if kind == "text":
        c.model.text.update(TEXT[key])
        return c
    vision, connector, text = SYSTEMS[key]
    c.model.vision.update(VISION[vision])
    c.model.connector.update(CONNECTORS[connector])
    c.model.text.update(TEXT[text])
    c.data.tile_size = VISION[vision].get("image_size", c.data.tile_size)  # a NaViT tower takes no tiles
    return c
