"""What the per-system stage configs share: the `STAGE[,tiny]` argument, the tiny variant, group rules.

`--config configs/sharegpt4v_7b.py:stage1` is the real recipe at the real size, its length in epochs of the
user's data (data.epochs: total_steps is counted from the packed rows at start-up); `:stage2,tiny` the same
recipe (groups, learning rates, schedule shape, resolution change) on a tiny model and the built-in synthetic
data, for tests and CPU runs, a fixed 4 steps. A later stage starts from the previous stage's parameters with a
fresh optimizer: `--config.init_params=STAGE1_WORKDIR` (or a checkpoint directory from `convert.py import`).
"""

import ml_collections

from configs import sizes

# Every rule table ends in a catch-all, so a parameter the recipe does not mention is frozen on purpose.
ADAPTERS = (".*/lora_[ab]", "lora")


def parse(arg: str, stages: tuple[str, ...]) -> tuple[str, bool]:
    """'stage2,tiny' -> ('stage2', True)."""
    stage, *flags = [p.strip() for p in arg.split(",") if p.strip()] or [stages[0]]
    unknown = [f for f in flags if f != "tiny"]
    if stage not in stages or unknown:
        raise ValueError(f"config argument {arg!r}: expected one of {list(stages)}, optionally followed by ',tiny'")
    return stage, "tiny" in flags


def system(name: str) -> ml_collections.ConfigDict:
    """base config with the system's real vision / connector / LLM sizes (configs/sizes.py), reading LLaVA
    json (`data.path`, `data.image_folder`, `data.tokenizer` are the user's to set), at scale: bf16 compute on
    fp32 master weights for what trains, bf16 storage for what does not (its matmuls read it in bf16 anyway),
    every parameter and its optimizer state sharded over all chips (FSDP), each block's activations recomputed in
    the backward pass, and the fast attention kernel of the platform it runs on."""
    c = sizes.get_config(name)
    c.data.source = "llava_json"
    # The release's training preprocessing, as each stage config sets it, not an import's processor file (an HF
    # LLaVA's plain CLIPImageProcessor would drop ShareGPT4V stage 2's pad to square).
    c.data.image_processor = "config"
    c.model.update(dtype="bfloat16", param_dtype="float32", frozen_param_dtype="bfloat16", remat_policy="full",
                   attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Examples decoded in worker processes, off the trainer's GIL: 4 a data shard hold two to three times the rate
    # a POINTS1.5-7B step at peak asks of a v5p host (docs/experiments.md 9), a few of its cores.
    c.data.workers = 4
    return c


def warmup(c: ml_collections.ConfigDict, fraction: float) -> None:
    """Warmup over `fraction` of the run, however long data.epochs makes it."""
    c.optim.warmup_steps, c.optim.warmup_fraction = 0, fraction


def epochs(c: ml_collections.ConfigDict, n: int) -> None:
    """A run of n passes over the data: total_steps is counted from its packed rows at start-up."""
    c.total_steps, c.data.epochs = 0, n


def make_tiny(c: ml_collections.ConfigDict, image_size: int) -> None:
    """Shrinks the model and data to CPU size, keeping the recipe (rules, groups, LR ratios) as it is.
    `image_size` is the tiny stand-in for the stage's resolution (so a 224 -> 448 change stays a change)."""
    # A fixed few steps rather than epochs of the synthetic data.
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 4, 8, 1, 4
    c.data.epochs = 0
    # CPU settings: fp32 for exact comparisons, one pass, data parallel over the test's fake devices, examples read
    # in threads (no worker processes to start).
    c.micro_batches, c.data.workers = 1, 0
    c.model.update(dtype="float32", frozen_param_dtype="", remat_policy="none", attention="xla")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.eval_examples, c.eval_batch_size = 8, 8
    c.model.vision.update(image_size=image_size, patch_size=image_size // 2, width=64, depth=4, heads=4,
                          mlp_dim=128)
    c.model.text.update(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128)
    if c.model.connector.kind == "qformer":  # keeps its query count: the placeholder layout stays the real one
        c.model.connector.update(width=32, layers=2, heads=2, mlp_dim=64)
    if c.model.connector.kind == "resampler":  # 256 queries would not fit a tiny row
        c.model.connector.update(num_queries=4, heads=2)
    if c.model.vision.stem == "qwenvl":  # a position table of the tiny patch grid
        c.model.vision.pos_grid = 2
    if c.model.vision.stem == "navit":  # the PatchMerger's hidden width follows the tower's
        c.model.connector.hidden_dim = 4 * c.model.vision.width
    if c.model.lora.rank:
        c.model.lora.update(rank=4, alpha=2.0 * 4)
    # The synthetic source writes multi-turn conversations, which the single-turn `plain` template refuses.
    c.data.update(source="synthetic", tokenizer="", path="", template="vicuna_v1", seq_len=128,
                  tile_size=image_size, max_tiles_per_row=6, min_image_size=image_size,
                  max_image_size=2 * image_size + 16, min_pixels=image_size ** 2,
                  max_pixels=(2 * image_size + 16) ** 2, max_patches_per_row=192)
    if c.data.vision_group_rows > 1:  # still grouped, in groups a 2-row batch holds
        c.data.vision_group_rows = 2
    c.optim.warmup_steps, c.optim.warmup_fraction = 1, 0.0
