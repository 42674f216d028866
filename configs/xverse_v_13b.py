"""XVERSE-V-13B (docs/architectures.md 1.7): `--config configs/xverse_v_13b.py:stage1` or `:stage2[,tiny]`.

stage1 (pre-training on image-text pairs): the projector (`llama_proj`) only; CLIP, `ln_vision` (the
connector's input LayerNorm) and the LLM frozen.
stage2 (instruction tuning): projector + LoRA on every LLM linear (q, k, v, o, gate, up, down in all
layers; r=128, alpha=256, dropout 0.05) with different learning rates for the two groups; base LLM frozen.
Learning rates, batch and steps are not published: the values here are LLaVA-style defaults (1e-3 for a
projector alone, 2e-5 projector / 2e-4 LoRA; one epoch of the given data, data.epochs), to be tuned.
HD tiles: 224 px, global view + up to 9 tiles, (1 + 9) * 256 = 2560 visual tokens, so rows are 4096 long.
Scale: v5e:4x4 (16 chips of 16 GiB), FSDP 16, 16 micro-batches (one row a chip at a time); each stage's
per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages

STAGES = ("stage1", "stage2")
LORA_TARGETS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = stages.system("xverse_v_13b")
    c.batch_size = 256
    stages.epochs(c, 1)
    c.micro_batches = 16  # 16 GiB v5e chips: one 4096-token row per chip at a time (docs/scale.md)
    c.data.update(template="xverse", seq_len=4096, tile_size=224, max_tiles=9, max_tiles_per_row=15,
                  swap_hw=True)
    # Training (prompt_template "Human: {}\nAssistant: ") and VQA evaluation write no system text; only the chat
    # demo's CONV_VISION_XVERSE has one (docs/architectures.md 1.6).
    c.data.system = ""
    o = c.optim
    o.weight_decay, o.schedule, o.final_lr_ratio, o.clip_norm = 0.0, "cosine", 0.0, 1.0
    frozen_norm = ("connector/in_norm/.*", "frozen")  # ln_vision stays frozen in both stages
    if stage == "stage1":
        o.lr = 1e-3
        o.trainable = [frozen_norm, ("connector/.*", "connector"), (".*", "frozen")]
    else:
        c.model.lora.update(rank=128, alpha=256.0, dropout=0.05, targets=LORA_TARGETS)
        o.lr = 2e-5
        o.trainable = [stages.ADAPTERS, frozen_norm, ("connector/.*", "connector"), (".*", "frozen")]
        o.groups.update(connector=dict(lr=2e-5), lora=dict(lr=2e-4))
    stages.warmup(c, 0.03)
    if tiny:
        stages.make_tiny(c, image_size=32)
    return c
