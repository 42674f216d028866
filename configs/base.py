"""The config schema: every key the library reads, with its meaning and default.

Each system config starts from `get_config()` here and updates its sections (never replaces them), so every
config has every key and `--config.a.b=value` can set any of them. Keys only one kind reads (a vision stem, a
connector kind, a data source) are declared too, with a neutral default, and say which kind reads them.
Configs saved before a key existed are brought up to this schema by vlm_jax/config.py `upgrade_config`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order and dropout
    c.total_steps = 1000  # optimizer steps of the run; 0 with data.epochs > 0, which counts them from the data
    c.batch_size = 8  # rows per optimizer step, over all devices
    c.micro_batches = 1  # gradient accumulation: each step's rows run as this many equal micro-batches in turn
    c.log_every = 10  # steps between metric lines (and TensorBoard scalars)
    c.checkpoint_every = 500  # steps between checkpoints (the last step always saves one)
    c.keep_checkpoints = 2  # checkpoints kept in the workdir, newest first
    c.eval_batch_size = 32  # prompts per generation batch in evaluation
    c.eval_examples = 256  # evaluation examples asked after training and by launch/eval.py
    c.max_new_tokens = 8  # tokens generated per evaluation answer
    # Evaluation during training: every eval_every steps (0: never) the model answers eval_benchmark, a
    # VLMEvalKit-style TSV file (docs/benchmarks.md; "": eval_examples held-out questions of the data source),
    # scored by eval_metric (auto | mc | vqa | exact); the scores go into that step's metrics.jsonl line (eval_*)
    # and TensorBoard.
    c.eval_every = 0
    c.eval_benchmark = ""
    c.eval_metric = "auto"
    c.init_params = ""  # a `launch/convert.py import` directory or a workdir: start from its params (fresh optimizer)
    c.init_fresh = ""  # regex of parameter paths that keep their fresh init instead (e.g. "connector/.*")
    # Resuming: comma-separated keys or sections (e.g. "optim.lr,total_steps") that may differ from the config the
    # checkpoint saved; the run goes on under the given values (vlm_jax/train/resume.py)
    c.allow_changes = ""

    # The demo's stage 0 (vlm_jax/demo/), run by the train command first when steps > 0: the vision tower trained
    # alone on the synthetic source's dense patch labels, then loaded into the VLM: a stand-in for the pretrained
    # tower a real run imports.
    p = c.vision_pretrain = ml_collections.ConfigDict()
    p.steps = 0  # 0: no stage 0
    p.batch_size = 64  # views per step (tiled stems), or packed rows (navit)
    p.lr = 2e-3  # peak learning rate (AdamW, warmup then cosine)
    p.warmup_steps = 30  # linear warmup steps
    p.final_lr_ratio = 0.05  # the cosine ends at lr * final_lr_ratio
    p.weight_decay = 0.01  # AdamW weight decay
    p.tile_fraction = 0.0  # tiled stems: share of views that are one tile of the image instead of the global view
    p.eval_images = 512  # images its patch accuracies are measured on

    # The device mesh (vlm_jax/parallel.py): axis sizes, -1 takes the devices the others leave.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data parallelism: rows split, parameters replicated
    c.mesh.fsdp = 1  # rows split and every parameter and its optimizer state sharded
    c.mesh.tensor = 1  # tensor parallelism: heads and MLP width split

    m = c.model = ml_collections.ConfigDict()
    m.dtype = "float32"  # compute dtype of every module
    m.param_dtype = "float32"  # storage dtype of the parameters that train (the master weights)
    # Storage of the parameters that do not train ("": param_dtype); "bfloat16" halves them (exact for weights
    # released in bf16; fp16-released ones lose 3 mantissa bits).
    m.frozen_param_dtype = ""
    m.scan_layers = True  # layer stacks as one scanned layer (stacked parameters); False: layers_0, layers_1, ...
    m.remat_policy = "none"  # what the backward pass recomputes: none | full | dots | dots_attention | dots_all
    # (layers/scan.py)
    # The attention kernel (vlm_jax/layers/attention.py): "xla" builds the segment/causal mask (CPU, tests);
    # "cudnn" (GPU) and "splash" (TPU) take the packed segments without an L x L mask; "auto" picks the kernel of
    # the platform the step is compiled for (the real stage configs).
    m.attention = "xla"
    m.max_segments = 64  # cudnn: packed segments per row (>= data.max_examples_per_row, data.max_images_per_row)
    # The training loss computes the logits of this many positions of a device's rows at a time (their weighted
    # positions only), with their gradients in the same pass (vlm_jax/layers/loss.py chunked_loss): no fp32
    # [rows, seq_len, vocab] logits; 0: all at once.
    m.loss_chunk_tokens = 256

    v = m.vision = ml_collections.ConfigDict()
    # clip (HF CLIPVisionModel) | eva (BLIP-2's EVA ViT-g) | qwenvl (Qwen-VL's ViT-bigG) | navit (Qwen2-VL's
    # native-resolution tower): vlm_jax/vision/vit.py.
    v.stem = "clip"
    v.image_size = 224  # clip, eva, qwenvl: tile side in pixels the tower takes
    v.patch_size = 14  # patch side in pixels
    v.width = 1024  # hidden width
    v.depth = 24  # blocks of the tower (only those feeding feature_layer are built)
    v.heads = 16  # attention heads
    v.mlp_dim = 4096  # MLP hidden width
    v.mlp_act = "quick_gelu"  # MLP activation: quick_gelu | gelu
    v.norm_eps = 1e-5  # LayerNorm epsilon
    v.pre_norm = True  # clip, eva, qwenvl: a LayerNorm after the stem (CLIP's pre_layrnorm, Qwen-VL's ln_pre)
    v.post_norm = False  # a LayerNorm on the output (BLIP-2's post_layernorm)
    v.feature_layer = -2  # the output is HF's hidden_states[feature_layer]
    v.drop_cls = True  # clip, eva: drop the class token from the output (qwenvl, navit have none: False)
    v.qkv_bias = "qkv"  # attention biases: "qkv", or "qv" (EVA: no key bias)
    v.pos_grid = 0  # qwenvl: side of the learned position table, resized to each tile's patch grid
    v.temporal_patch_size = 2  # navit: frames per patch (an image is repeated to fill them)
    v.rope_base = 1e4  # navit: base of the 2-D RoPE over patch (row, col)

    n = m.connector = ml_collections.ConfigDict()
    n.kind = "mlp"  # mlp (LLaVA / PatchMerger) | qformer (BLIP-2) | resampler (Qwen-VL): vlm_jax/connectors.py
    n.norm_eps = 1e-5  # LayerNorm epsilon of every connector kind
    n.in_norm = False  # mlp: LayerNorm on the vision features first (XVERSE-V ln_vision, PatchMerger ln_q)
    # mlp: m > 1 makes one visual token per m x m patch window (PatchMerger; on tiles, pixel-shuffle-like); the
    # navit data cuts images into whole windows of this size too.
    n.merge_size = 1
    n.hidden_dim = 0  # mlp: hidden width of the MLP; 0: the LLM width (LLaVA)
    n.num_queries = 0  # qformer, resampler: learned queries, the visual tokens of each image (0: the mlp kind)
    n.heads = 12  # qformer, resampler: attention heads
    n.width = 768  # qformer: hidden width of its layers
    n.layers = 12  # qformer: BERT layers
    n.mlp_dim = 3072  # qformer: FFN hidden width
    n.cross_attention_frequency = 2  # qformer: every this many layers, the first of them, attend to the image

    t = m.text = ml_collections.ConfigDict()
    t.vocab_size = 32000  # vocabulary (embedding rows, logits)
    t.hidden = 4096  # hidden width
    t.layers = 32  # decoder blocks
    t.heads = 32  # query heads
    t.kv_heads = 32  # key/value heads (< heads: grouped-query attention)
    t.head_dim = 128  # width of one head
    t.ffn = 11008  # SwiGLU hidden width
    t.rms_eps = 1e-5  # RMSNorm epsilon
    t.rope_base = 10000.0  # RoPE base (theta)
    t.qkv_bias = False  # biases on q, k, v (Qwen)
    t.tie_embeddings = False  # the LM head is the embedding table
    t.rope_kind = "1d"  # 1d | mrope (Qwen2-VL's multimodal RoPE: positions [B, L, 3] from NaViT image grids)
    t.mrope_sections = []  # mrope: rotary pairs of each head given to (frame, row, col), summing to head_dim / 2

    # LoRA adapters on the Dense layers whose module path fully matches `targets` (vlm_jax/layers/lora.py).
    r = m.lora = ml_collections.ConfigDict()
    r.rank = 0  # 0: no adapters
    r.alpha = 16.0  # the update is scaled by alpha / rank
    r.dropout = 0.0  # dropout on the adapter's input while training
    r.targets = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"  # regex of module paths

    d = c.data = ml_collections.ConfigDict()
    # synthetic (built-in shapes data, vlm_jax/data/synthetic.py) | llava_json | array_record: the training source
    # without data.mixture, and the evaluation source always
    d.source = "synthetic"
    d.path = ""  # llava_json: the training .json / .jsonl file or a folder holding data.json; array_record: the folder
    d.eval_path = ""  # the evaluation data, as data.path
    d.image_folder = ""  # llava_json: images resolve here; empty = the json's folder
    d.tokenizer = ""  # a Hugging Face tokenizer directory; empty: the one recorded with init_params, else the demo one
    d.image_token_id = -1  # image placeholder id when the vocabulary lacks <image> (LLaVA: -200); -1: it must have it
    d.template = "vicuna_v1"  # conversation template (vlm_jax/data/conversation.py)
    d.system = ""  # system text of the template's system prefix ("": no system prefix)
    d.seq_len = 2048  # tokens per packed row
    d.skip_too_long = False  # False: an example longer than seq_len is an error naming it
    # A record that cannot be used (its structure, text that is not UTF-8, an image missing, corrupt or over
    # max_image_pixels, its tokens): "raise" stops the run with one error naming the file, record and reason; "skip"
    # leaves it out with a warning and counts it in metrics.jsonl as bad_records (vlm-check-data lists them first).
    d.on_bad_record = "raise"
    d.max_bad_fraction = 0.01  # skip: a data shard stops once more than this share of each epoch begun was bad
    d.max_image_pixels = 89478485  # an image of more pixels is a bad record (0: no limit); PIL's MAX_IMAGE_PIXELS
    # 0: the run is total_steps long; N: N passes over the training data, every example N times: total_steps (set
    # to 0) becomes the steps the packed rows of N epochs take (counted at start-up from text and image sizes,
    # data/epochs.py).
    d.epochs = 0
    # Weighted mixture of training sources: [(source_config, weight), ...]; empty: the one source data.source /
    # data.path. A source_config dict sets the data keys of its own source (source, path, image_folder,
    # max_image_pixels, num_train, exclude_qtypes, min_image_size, max_image_size; the others are the run's) and an
    # optional "name" (default: its file's name or its kind) for metrics.jsonl's examples/<name> and loss/<name>.
    # A source takes weight / sum(weights) of every prefix of the stream, each shuffled with its own seed and
    # reshuffled every pass; data.epochs must be 0 with it (total_steps sets the run's length). The evaluation
    # source stays data.source / data.eval_path. Example:
    #   [({"source": "llava_json", "path": "llava_v1_5_mix665k.json", "image_folder": "images"}, 0.6),
    #    ({"source": "llava_json", "path": "share-captioner_coco_lcs_sam_1246k_1107.json"}, 0.3),
    #    ({"source": "llava_json", "path": "sharegpt_text.json", "name": "text"}, 0.1)]
    d.mixture = []
    d.max_examples_per_row = 64  # examples packed into one row at most
    # 0: rows take consecutive examples; N: the rows of every N examples are planned together (best-fit
    # decreasing, data/packing.py plan_rows): a few percent padding instead of about half an example a row.
    d.pack_window = 0
    # The training stream is cut into this many shards (shard s: examples s, s + shards, ...), each packed on its
    # own into batch_size / shards rows of every batch, in shard order: a step's batch depends on the config, never
    # on the process count. A process builds the shards its devices' rows fall on, so the process count divides it.
    d.shards = 1
    # Grain worker processes per data shard (a process builds the shards of its devices' rows) that read, decode,
    # preprocess and tokenise its examples; 0: data.threads threads of the training process do (the batches are
    # the same either way: docs/contracts.md, training data iterator).
    d.workers = 0
    d.threads = 2  # data.workers=0: preprocessing threads per data shard (PIL, numpy and the tokenizer release the GIL)
    d.prefetch = 2  # batches built ahead of the training step
    # Tiled stems (clip, eva, qwenvl): a global view plus a grid of tiles per image (vlm_jax/data/images.py).
    d.tile_size = 224  # tile side in pixels (the vision tower's image_size)
    d.max_tiles = 9  # tiles of the grid besides the global view, at most (1: the global view alone)
    d.swap_hw = True  # XVERSE-V's grid orientation: non-square images come out with their aspect ratio swapped
    d.max_tiles_per_row = 20  # tile slots of a packed row
    # Tiled stems: how an image becomes a tile (vlm_jax/data/image_processor.py). "auto": the processor recorded
    # with init_params (an import's tokenizer/preprocessor_config.json, or the one a workdir's run used), else the
    # two keys below; "config": the keys below; or a directory holding a transformers preprocessor_config.json.
    d.image_processor = "auto"
    d.image_resize = "squash"  # squash: straight to tile_size square | shortest_edge_crop: CLIP's resize + centre crop
    d.image_pad_square = False  # first pad to a square with the mean colour (LLaVA's image_aspect_ratio="pad")
    # navit stem: images at native resolution (smart_resize into [min_pixels, max_pixels]), every image of a row
    # packed into max_patches_per_row patch slots.
    d.min_pixels = 56 * 56  # navit: fewest pixels an image is resized to
    d.max_pixels = 28 * 28 * 1280  # navit: most pixels an image is resized to
    d.max_patches_per_row = 4096  # navit: patch slots of a vision row (a multiple of connector.merge_size ** 2)
    d.max_images_per_row = 8  # navit: images of a vision row at most
    # navit: g > 1 makes every g rows share their g vision rows (data/packing.py plan_groups; needs pack_window),
    # so a row's text and its images need not fill it in the same proportion.
    d.vision_group_rows = 1
    d.num_train = 100000  # synthetic: training examples
    d.num_eval = 512  # synthetic: evaluation examples
    d.exclude_qtypes = ()  # synthetic: question types its training records never ask (a held-out type)
    d.min_image_size = 64  # synthetic: smallest image side in pixels
    d.max_image_size = 448  # synthetic: largest image side in pixels

    o = c.optim = ml_collections.ConfigDict()
    # Defaults of every parameter group; `groups.<group>` overrides them (see vlm_jax/train/param_groups.py).
    o.optimizer = "adamw"  # adamw | sgd
    o.lr = 2e-5  # peak learning rate
    o.warmup_steps = 100  # linear warmup from 0 to lr
    o.warmup_fraction = 0.0  # > 0: the warmup is this share of total_steps instead (warmup_steps must be 0)
    o.schedule = "cosine"  # after warmup: cosine | linear | constant, down to lr * final_lr_ratio
    o.final_lr_ratio = 0.0  # the schedule ends at lr * final_lr_ratio
    o.weight_decay = 0.0  # decoupled weight decay (AdamW)
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.999  # Adam beta2
    o.clip_norm = 1.0  # global gradient norm clip (0: none)
    o.max_skipped_steps = 10  # the run stops after this many steps in a row skip their non-finite update
    # (path regex, group) or (path regex, group, "start:stop") for layers of a scanned stack; first match wins.
    o.trainable = [("vision/.*", "frozen"), (".*", "train")]
    # group -> overrides of {lr, warmup_steps, warmup_fraction, final_lr_ratio, schedule, weight_decay,
    # frozen}
    o.groups = ml_collections.ConfigDict()
    return c
