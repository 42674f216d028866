"""Config files are Python modules with `get_config()`; overrides are `--config.a.b=value`.

An override that names a key the config does not have is an error that names it, so a typo never
trains with a silently ignored setting. The schema, every key with its meaning, is configs/base.py; configs
saved by older versions are brought up to it by `upgrade_config` / `upgrade_model_config`, the one place
that knows how the schema changed.
"""

import ast
import difflib
import importlib.util
import json
import os

import ml_collections

from configs import base
from vlm_jax.errors import InputError

# Keys added since configs were first saved, each with the value that reproduces how a config saved before it
# computed; pinned here so that changing base's default later leaves old runs as they were. A key missing from a
# saved config and not named here takes base's default.
ADDED = {
    # Chunking only (resume FREE): the chunked default keeps an older big run's memory bounded when it resumes.
    "model.loss_chunk_tokens": 256,
    "model.attention": "xla",
    "model.max_segments": 64,
    "model.frozen_param_dtype": "",  # every parameter stored as param_dtype
    "model.text.rope_kind": "1d",
    "model.connector.merge_size": 1,
    "model.connector.hidden_dim": 0,
    "model.lora.rank": 0,
    "data.vision_group_rows": 1,
    "data.shards": 1,
    "data.epochs": 0,  # the run was total_steps long
    "data.mixture": [],  # one training source, data.source / data.path
    "optim.warmup_fraction": 0.0,  # the warmup was warmup_steps long
    "optim.max_skipped_steps": 1,  # the run stopped at the first non-finite loss it logged
    "data.image_processor": "config",  # images were squashed whatever init_params held
    "data.image_resize": "squash",
    "data.image_pad_square": False,
    "vision_pretrain.steps": 0,
    "allow_changes": "",  # never compared (vlm_jax/train/resume.py FREE)
    "data.on_bad_record": "raise",
    "data.max_bad_fraction": 0.01,  # read only when skipping, which older runs never did
    "data.max_image_pixels": 2 * 89478485,  # PIL refused images over twice its MAX_IMAGE_PIXELS (and warned)
    "data.threads": 2,  # never compared (resume FREE); older runs read in data.workers threads
    "eval_every": 0,  # no evaluation during training
    "eval_benchmark": "",
    "eval_metric": "auto",
}
# Keys that moved or went: old dotted path -> new dotted path, or None for a key whose value lives elsewhere
# (vision.spatial_merge_size duplicated connector.merge_size, which the model always read).
MOVED = {
    "model.vision.spatial_merge_size": None,
    "model.loss_vocab_chunk": None,  # the loss walked the vocabulary in chunks; model.loss_chunk_tokens replaced it
}

# Sizes and counts: a value below 1 makes a shape, a loop or a division fail deep inside with no key named.
POSITIVE = (
    "batch_size", "micro_batches", "log_every", "keep_checkpoints", "eval_batch_size", "max_new_tokens",
    "vision_pretrain.batch_size", "vision_pretrain.eval_images", "model.max_segments",
    "model.vision.image_size", "model.vision.patch_size", "model.vision.width", "model.vision.depth",
    "model.vision.heads", "model.vision.mlp_dim", "model.vision.temporal_patch_size",
    "model.connector.merge_size", "model.connector.heads", "model.connector.width", "model.connector.layers",
    "model.connector.mlp_dim", "model.connector.cross_attention_frequency",
    "model.text.vocab_size", "model.text.hidden", "model.text.layers", "model.text.heads", "model.text.kv_heads",
    "model.text.head_dim", "model.text.ffn",
    "data.seq_len", "data.max_examples_per_row", "data.shards", "data.threads", "data.tile_size", "data.max_tiles",
    "data.max_tiles_per_row", "data.min_pixels", "data.max_pixels", "data.max_patches_per_row",
    "data.max_images_per_row", "data.vision_group_rows", "data.num_train", "data.num_eval", "data.min_image_size",
    "data.max_image_size", "optim.max_skipped_steps",
)
# Steps and counts where 0 means "none" or "off" (each key's comment in configs/base.py says which).
NON_NEGATIVE = (
    "total_steps", "checkpoint_every", "eval_examples", "eval_every", "vision_pretrain.steps",
    "vision_pretrain.warmup_steps", "model.loss_chunk_tokens", "model.connector.hidden_dim",
    "model.connector.num_queries", "model.vision.pos_grid", "model.lora.rank", "data.epochs", "data.pack_window",
    "data.workers", "data.prefetch", "data.max_image_pixels", "optim.warmup_steps",
)
# Shares: a value outside [0, 1] means nothing.
FRACTIONS = ("data.max_bad_fraction",)


def _choices() -> dict[str, tuple[str, ...]]:
    """Each choice key -> its choices, read from the table the code that takes the key dispatches on (imported
    here, not at module import: the plan command sets up its devices before jax is imported)."""
    from vlm_jax.benchmarks import METRICS
    from vlm_jax.connectors import CONNECTORS
    from vlm_jax.data.conversation import TEMPLATES
    from vlm_jax.data.image_processor import CONFIG_RESIZES
    from vlm_jax.data.pipeline import ON_BAD_RECORD, SOURCES
    from vlm_jax.layers.attention import BACKENDS
    from vlm_jax.layers.mlp import ACTIVATIONS
    from vlm_jax.layers.rope import ROPE_KINDS
    from vlm_jax.layers.scan import REMAT_POLICIES
    from vlm_jax.train.optim import OPTIMIZERS, SCHEDULES
    from vlm_jax.vision.vit import QKV_BIAS, STEMS

    return {
        "optim.optimizer": OPTIMIZERS, "optim.schedule": SCHEDULES,
        "model.attention": ("auto", *BACKENDS), "model.remat_policy": tuple(REMAT_POLICIES),
        "model.vision.stem": tuple(STEMS), "model.vision.mlp_act": tuple(ACTIVATIONS),
        "model.vision.qkv_bias": QKV_BIAS, "model.connector.kind": tuple(CONNECTORS),
        "model.text.rope_kind": tuple(k for k in ROPE_KINDS if k != "2d"),  # 2d is the navit tower's
        "data.source": SOURCES, "data.template": tuple(TEMPLATES), "data.image_resize": tuple(CONFIG_RESIZES),
        "data.on_bad_record": ON_BAD_RECORD, "eval_metric": ("auto", *METRICS),
    }


def check_values(config: ml_collections.ConfigDict) -> None:
    """Rejects, before a command builds or writes anything, a size or count below 1 (POSITIVE), a step count
    below 0 (NON_NEGATIVE), a share outside [0, 1] (FRACTIONS), a choice key naming no choice, an
    `allow_changes` naming no key and a data.mixture entry that is malformed (data/mixture.py training_sources) or
    whose source's own keys fail the checks above, each with one error naming the key (and entry) and value."""
    _check_keys(config)
    if config.total_steps == 0 and not config.data.epochs:
        raise InputError("config key total_steps=0 trains nothing: give the steps, or data.epochs to count them")
    for name in allowed_changes(config):  # a misspelt name would allow nothing and say nothing
        try:
            _get(config, name)
        except (KeyError, TypeError):  # no such key; a key under a value
            raise InputError(f"config key allow_changes names {name!r}, which is no config key or section") from None
    if config.data.mixture:
        from vlm_jax.data.mixture import training_sources
        if config.data.epochs:
            raise InputError(f"config key data.epochs={config.data.epochs} counts passes over one source, but "
                             "data.mixture draws each of its sources at its weight, so their epochs end at different "
                             "steps: set data.epochs=0 and total_steps")
        for source in training_sources(config):  # each source's own data keys, checked as the run's are
            try:
                _check_keys(source.config)
            except InputError as e:
                raise InputError(f"data.mixture source {source.name!r}: {e}") from None


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


def _check_keys(config: ml_collections.ConfigDict) -> None:
    """The POSITIVE, NON_NEGATIVE, FRACTIONS and choice keys of `config` (check_values)."""
    for key in POSITIVE:
        if _get(config, key) < 1:
            raise InputError(f"config key {key}={_get(config, key)!r} must be at least 1")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise InputError(f"config key {key}={_get(config, key)!r} must be 0 or more")
    for key in FRACTIONS:
        if not 0 <= _get(config, key) <= 1:
            raise InputError(f"config key {key}={_get(config, key)!r} must be between 0 and 1")
    for key, choices in _choices().items():
        if _get(config, key) not in choices:
            raise InputError(f"config key {key}={_get(config, key)!r} is not one of {', '.join(map(repr, choices))}")


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
    """The keys and sections (dotted) whose differences from a resumed checkpoint's config `allow_changes` accepts."""
    return [n.strip() for n in config.allow_changes.split(",") if n.strip()]


def load_config(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Loads `path` (optionally `path:arg` passed to get_config) and applies `key=value` overrides."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file not found: {file}")
    spec = importlib.util.spec_from_file_location(f"_vlm_config_{abs(hash(file))}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} has no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} must look like key=value")
        set_key(config, key, value)
    return config


def set_key(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets `config.<dotted>` from a command-line string, parsed to the existing value's type."""
    *parents, leaf = dotted.split(".")
    node, walked = config, []
    for name in parents + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(name, keys, n=3)
            where = ".".join(walked) or "<top level>"
            raise KeyError(
                f"unknown config key {dotted!r}: {where} has no {name!r}"
                + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
        if name != leaf:
            node = node[name]
            walked.append(name)
    node[leaf] = _parse_like(node[leaf], raw, dotted)


def _parse_like(current, raw: str, key: str):
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key!r}: cannot parse {raw!r} as {type(current).__name__}")
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects True/False, got {raw!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
        raise ValueError(f"config key {key!r} expects {type(current).__name__}, got {raw!r}")
    return value


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=list)


def upgrade_config(saved: dict) -> ml_collections.ConfigDict:
    """A whole config saved by any version (a workdir's config.json) in today's schema: configs/base.py with the
    saved values on top, moved keys renamed, and keys added since filled with the value that computes what the
    saved run computed (ADDED). A saved key the schema does not know is an error naming it."""
    flat = _flatten(saved)
    for old, new in MOVED.items():
        if old in flat:
            value = flat.pop(old)
            if new is not None:
                flat.setdefault(new, value)
    schema = base.get_config()
    for key, value in ADDED.items():
        flat.setdefault(key, value)
    for key, value in sorted(flat.items()):
        _set_saved(schema, key, value)
    return schema


def upgrade_model_config(saved: dict) -> ml_collections.ConfigDict:
    """`upgrade_config` of a model section alone (a checkpoint directory's vlm_jax.json stores only `model`)."""
    return upgrade_config({"model": saved}).model


# Sections whose keys are names the user chooses (parameter groups), taken whole rather than key by key.
_FREE_FORM = ("optim.groups",)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, (dict, ml_collections.ConfigDict)) and path not in _FREE_FORM:
            out.update(_flatten(dict(value), path + "."))
        else:
            out[path] = value
    return out


def _set_saved(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name] if isinstance(node, ml_collections.ConfigDict) and name in node else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"saved config key {dotted!r} is not in the schema (configs/base.py) and no upgrade "
                         "(vlm_jax/config.py MOVED) says where it went: add it there, or delete it from the saved "
                         "config if it was never read")
    if dotted in _FREE_FORM:
        value = ml_collections.ConfigDict(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ValueError(f"saved config key {dotted!r}: {e}") from None
