"""Config files are Python modules with `get_config()`; overrides are `--config.a.b=value`.

An override that names a key the config does not have is an error that names it, so a typo never
trains with a silently ignored setting.
"""

import ast
import difflib
import importlib.util
import json
import os

import ml_collections


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
