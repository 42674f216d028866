"""ShareGPT4V-13B: the 7B recipe (configs/sharegpt4v_7b.py) with Vicuna-13B; `:stage1` or `:stage2[,tiny]`.

Scale: v5p:2x2x4 (16 chips), FSDP 16, one pass a step; each stage's per-chip peak is in docs/scale.md.
"""

import ml_collections

from configs import stages
from configs.sharegpt4v_7b import STAGES, recipe


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    return recipe(stages.system("sharegpt4v_13b"), stage, tiny)
