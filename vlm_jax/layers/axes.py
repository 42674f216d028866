"""Logical axis names shared by every model.

Models only ever name axes; `vlm_jax/parallel.py` maps these names onto mesh axes. With no rules active
(plain CPU) the constraints are no-ops.
"""

# Parameter axes.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"  # stacked-block axis added by nn.scan
PATCH = "patch"  # flattened patch pixels entering the ViT stem
NORM = "norm"

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

# Common activation layouts.
BLE = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
BLM = (ACT_BATCH, ACT_LENGTH, ACT_MLP)
BLV = (ACT_BATCH, ACT_LENGTH, ACT_VOCAB)
BLHD = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None)
BLKD = (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, None)
