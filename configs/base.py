"""Defaults shared by every config: each system config starts from `get_config()` here."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8  # rows per optimizer step, over all devices
    # Gradient accumulation: each step's batch_size rows run as this many equal micro-batches, one after another.
    c.micro_batches = 1
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.eval_batch_size = 32
    c.eval_examples = 256
    c.max_new_tokens = 8
    c.init_params = ""  # a `launch/convert.py import` directory: start from its params (fresh optimizer)
    c.init_fresh = ""  # regex of parameter paths that keep their fresh init instead (e.g. "connector/.*")
    # Stage 0 (vlm_jax/train/vision_pretrain.py), run first when steps > 0: the vision tower trained alone on the
    # synthetic source's dense patch labels, then loaded into the VLM. A stand-in for the pretrained tower a real
    # run imports; batch_size is views (tiled stems: the global view, or a tile tile_fraction of the time) or
    # packed rows (navit) per step.
    c.vision_pretrain = ml_collections.ConfigDict(dict(
        steps=0, batch_size=64, lr=2e-3, warmup_steps=30, final_lr_ratio=0.05, weight_decay=0.01,
        tile_fraction=0.0, eval_images=512))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    m = c.model = ml_collections.ConfigDict()
    m.dtype = "float32"
    m.param_dtype = "float32"
    # Storage of the parameters that do not train ("": param_dtype); "bfloat16" halves them (exact for weights
    # released in bf16; fp16-released ones lose 3 mantissa bits).
    m.frozen_param_dtype = ""
    m.scan_layers = True
    m.remat_policy = "none"
    # The attention kernel (vlm_jax/layers/attention.py): "xla" builds the segment/causal mask (CPU, tests);
    # "cudnn" (GPU) and "splash" (TPU) take the packed segments without an L x L mask; "auto" picks the kernel of
    # the platform the step is compiled for (the real stage configs).
    m.attention = "xla"
    m.max_segments = 64  # cudnn: packed segments per row (>= data.max_examples_per_row, data.max_images_per_row)
    m.loss_vocab_chunk = 8192  # training loss walks the vocabulary this many logits at a time; 0: all at once
    m.vision = ml_collections.ConfigDict(dict(
        stem="clip", image_size=224, patch_size=14, width=1024, depth=24, heads=16,
        mlp_dim=4096, mlp_act="quick_gelu", norm_eps=1e-5, pre_norm=True,
        feature_layer=-2, drop_cls=True, qkv_bias="qkv", post_norm=False))
    # merge_size m > 1: one visual token per m x m patch window (PatchMerger; on tiles, pixel-shuffle-like);
    # hidden_dim 0: the MLP's hidden width is the LLM width (LLaVA).
    m.connector = ml_collections.ConfigDict(dict(kind="mlp", in_norm=False, norm_eps=1e-5, merge_size=1,
                                                 hidden_dim=0))
    # LoRA adapters on the Dense layers whose module path fully matches `targets` (rank 0: none).
    m.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0,
        targets=r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"))
    m.text = ml_collections.ConfigDict(dict(
        vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
        ffn=11008, rms_eps=1e-5, rope_base=10000.0, qkv_bias=False, tie_embeddings=False))

    d = c.data = ml_collections.ConfigDict()
    d.source = "synthetic"
    d.path = ""  # llava_json: the .json file, or a folder holding data.json
    d.eval_path = ""
    d.image_folder = ""  # images resolve here; empty = the json's folder
    d.image_token_id = -1  # -1: the tokenizer's <image> token
    d.skip_too_long = False  # False: an example longer than seq_len is an error naming it
    d.workers = 2
    d.prefetch = 2
    d.tokenizer = ""
    d.template = "vicuna_v1"
    d.system = ""
    d.seq_len = 2048
    d.tile_size = 224
    d.max_tiles = 9
    d.swap_hw = True
    d.max_tiles_per_row = 20
    d.max_examples_per_row = 64
    # 0: rows take consecutive examples; N: the rows of every N examples are planned together (best-fit
    # decreasing, data/packing.py plan_rows): a few percent padding instead of about half an example a row.
    d.pack_window = 0
    # NaViT models (model.vision.stem="navit"): images at native resolution (smart_resize into
    # [min_pixels, max_pixels]), every image of a row packed into max_patches_per_row patch slots.
    d.min_pixels = 56 * 56
    d.max_pixels = 28 * 28 * 1280
    d.max_patches_per_row = 4096
    d.max_images_per_row = 8
    # g > 1: every g rows share their g vision rows (data/packing.py plan_groups; needs pack_window), so a row's
    # text and its images need not fill it in the same proportion: on a mix of large and small images it leaves
    # far less padding than rows that hold their own images (bench/packing.py, docs/experiments.md 3).
    d.vision_group_rows = 1
    # The training stream is cut into this many shards (shard s: examples s, s + shards, ...), each packed on its
    # own into batch_size / shards rows of every batch, in shard order: a step's batch depends on the config, never
    # on the process count. A process builds the shards its devices' rows fall on, so the process count divides it.
    d.shards = 1
    d.num_train = 100000
    d.num_eval = 512
    d.exclude_qtypes = ()  # synthetic: question types its training records never ask (a held-out type)
    d.min_image_size = 64
    d.max_image_size = 448

    o = c.optim = ml_collections.ConfigDict()
    # Defaults of every parameter group; `groups.<group>` overrides them (see vlm_jax/train/param_groups.py).
    o.optimizer = "adamw"  # or "sgd"
    o.lr = 2e-5
    o.warmup_steps = 100
    o.schedule = "cosine"  # after warmup: cosine | linear | constant, down to lr * final_lr_ratio
    o.final_lr_ratio = 0.0
    o.weight_decay = 0.0
    o.b1 = 0.9
    o.b2 = 0.999
    o.clip_norm = 1.0
    # (path regex, group) or (path regex, group, "start:stop") for layers of a scanned stack; first match wins.
    o.trainable = [("vision/.*", "frozen"), (".*", "train")]
    # group -> overrides of {lr, warmup_steps, final_lr_ratio, schedule, weight_decay, frozen}
    o.groups = ml_collections.ConfigDict()
    return c
