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

# Keys added since configs were first saved, each with the value that reproduces how a config saved before it
# computed; pinned here so that changing base's default later leaves old runs as they were. A key missing from a
# saved config and not named here takes base's default.
ADDED = {
    "model.loss_vocab_chunk": 0,  # the logits were computed for the whole vocabulary at once
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
    "optim.warmup_fraction": 0.0,  # the warmup was warmup_steps long
    "optim.max_skipped_steps": 1,  # the run stopped at the first non-finite loss it logged
    "data.image_processor": "config",  # images were squashed whatever init_params held
    "data.image_resize": "squash",
    "data.image_pad_square": False,
    "vision_pretrain.steps": 0,
}
# Keys that moved or went: old dotted path -> new dotted path, or None for a key whose value lives elsewhere
# (vision.spatial_merge_size duplicated connector.merge_size, which the model always read).
MOVED = {
    "model.vision.spatial_merge_size": None,
}


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
