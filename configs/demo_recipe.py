"""The seeds' two-stage recipe replayed on the demo: `--config configs/demo_recipe.py:stage1` or `:stage2[,tiny]`.

Both stages start from a trained demo model and keep its ViT frozen, as the seeds keep their pretrained tower.
stage1 (alignment): the projector re-initialised (`init_fresh`) and trained alone, LLM frozen, on data that never
asks the held-out question type (`data.exclude_qtypes`, shape questions by default).
stage2 (instruction tuning): projector + LoRA on every decoder linear with a 5x higher LR for the adapters
(XVERSE-V's groups), base LLM frozen, on the full question mix.

    make demo   # runs/demo
    python launch/train.py --config configs/demo_recipe.py:stage1 --workdir runs/recipe1 \\
        --config.init_params=runs/demo
    python launch/train.py --config configs/demo_recipe.py:stage2 --workdir runs/recipe2 \\
        --config.init_params=runs/recipe1
    python launch/eval.py --config configs/demo_recipe.py:stage2 --workdir runs/recipe2
"""

import ml_collections

from configs import demo, stages

STAGES = ("stage1", "stage2")


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    stage, tiny = stages.parse(arg, STAGES)
    c = demo.get_config()
    c.vision_pretrain.steps = 0  # the tower comes with the trained demo model
    c.total_steps, c.checkpoint_every = 300, 300
    o = c.optim
    o.warmup_steps = 20
    if stage == "stage1":
        c.init_fresh = "connector/.*"
        c.data.exclude_qtypes = ("shape", "caption")
        o.lr = 1e-3
        o.trainable = [("connector/.*", "connector"), (".*", "frozen")]
    else:
        c.model.lora.update(rank=8, alpha=16.0, dropout=0.0)
        o.lr = 2e-4
        o.trainable = [stages.ADAPTERS, ("connector/.*", "connector"), (".*", "frozen")]
        o.groups.update(connector=dict(lr=2e-4), lora=dict(lr=1e-3))
    if tiny:
        stages.make_tiny(c, image_size=32)
    return c
