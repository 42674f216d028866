"""Parameter groups: which parameters train, at what learning rate and weight decay, chosen by path regex.

`optim.trainable` is an ordered table of rules `(regex, group)` or `(regex, group, "start:stop")`. Every
parameter path (`vision/layers/attn/q_proj/kernel`) takes the group of the first rule whose regex fully
matches it. The three-element form is a partial unfreeze under `nn.scan`: the matched parameters are
stacked on a leading layer axis, only layers start..stop-1 belong to the group and the other layers stay
frozen (ShareGPT4V stage 1 trains ViT layers 12-23 of 24).

`optim.groups.<group>` overrides the optimizer defaults in `optim` for that group: `lr`, `warmup_steps`,
`warmup_fraction`, `final_lr_ratio`, `schedule`, `weight_decay`, `frozen`. A group named by a rule but absent from
`optim.groups` takes the defaults; the group `frozen` is always frozen. Frozen parameters live outside
the optimizer (no gradients, no optimizer state).
"""

import dataclasses
import json
import os
import re
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from vlm_jax.files import replace_file

FROZEN = "frozen"
GROUP_KEYS = ("lr", "warmup_steps", "warmup_fraction", "final_lr_ratio", "schedule", "weight_decay", "frozen")

Path = tuple[str, ...]


def param_path(path: Path) -> str:
    return "/".join(path)


@dataclasses.dataclass(frozen=True)
class Assignment:
    group: str
    layers: slice | None = None  # set: only these indices of the leading (scan) axis belong to `group`


def _parse_layers(spec: str, rule: tuple) -> slice:
    start, sep, stop = str(spec).partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise ValueError(f"optim.trainable rule {rule}: layer range {spec!r} must look like 'start:stop'") from None


def assign_params(params, rules: list[tuple], what: str = "optim.trainable") -> dict[Path, Assignment]:
    """Maps every parameter path to the assignment of the first rule whose regex fully matches it.

    A parameter matched by no rule, or a rule that matches no parameter, is an error: both are
    almost always a typo that would otherwise freeze or train the wrong weights silently.
    """
    flat = traverse_util.flatten_dict(params)
    compiled = []
    for rule in rules:
        if len(rule) not in (2, 3):
            raise ValueError(f"{what}: rule {rule} must be (regex, group) or (regex, group, 'start:stop')")
        compiled.append((re.compile(rule[0]), rule[1], _parse_layers(rule[2], rule) if len(rule) == 3 else None))
    used = [False] * len(compiled)
    out, unmatched = {}, []
    for path, leaf in flat.items():
        name = param_path(path)
        for i, (regex, group, layers) in enumerate(compiled):
            if regex.fullmatch(name):
                if layers is not None:
                    if "layers" not in path:
                        raise ValueError(f"{what}: rule {rules[i]} selects layers of {name}, which is not "
                                         f"a scanned layer stack (no 'layers' in its path)")
                    if group == FROZEN or not range(leaf.shape[0])[layers]:
                        raise ValueError(f"{what}: rule {rules[i]} selects no trainable layer of {name} "
                                         f"({leaf.shape[0]} layers)")
                out[path], used[i] = Assignment(group, layers), True
                break
        else:
            unmatched.append(name)
    if unmatched:
        raise ValueError(f"{what}: no rule matches parameter(s) {unmatched[:10]}"
                         + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""))
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"{what}: rule(s) {unused} match no parameter")
    return out


def label_params(params, rules: list[tuple], what: str = "optim.trainable") -> dict[Path, str]:
    """Parameter path -> group name (see assign_params)."""
    return {path: a.group for path, a in assign_params(params, rules, what).items()}


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    lr: float
    warmup_steps: int
    warmup_fraction: float  # > 0: the warmup is this share of the run's steps instead of warmup_steps
    final_lr_ratio: float
    schedule: str
    weight_decay: float
    frozen: bool


def group_specs(o: ml_collections.ConfigDict, groups: set[str]) -> dict[str, GroupSpec]:
    """Each used group's settings: `optim` defaults with `optim.groups.<group>` on top."""
    overrides = o.groups.to_dict()
    unused = sorted(set(overrides) - groups)
    if unused:
        raise ValueError(f"optim.groups: group(s) {unused} are named by no optim.trainable rule "
                         f"(rules name {sorted(groups)})")
    specs = {}
    for g in sorted(groups):
        given = overrides.get(g, {})  # a group without overrides takes the optim defaults
        unknown = sorted(set(given) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"optim.groups.{g}: unknown key(s) {unknown}; allowed: {list(GROUP_KEYS)}")
        values = {k: o[k] for k in GROUP_KEYS if k != "frozen"} | {"frozen": g == FROZEN} | given
        if g == FROZEN and values["frozen"] is not True:
            raise ValueError(f"optim.groups.{FROZEN}: the group named {FROZEN!r} is always frozen")
        values["frozen"] = bool(values["frozen"]) or g == FROZEN
        where = f"optim.groups.{g}" if {"warmup_steps", "warmup_fraction"} & set(given) else "optim"
        if not 0 <= values["warmup_fraction"] < 1:
            raise ValueError(f"{where}: warmup_fraction={values['warmup_fraction']} must be in [0, 1)")
        if values["warmup_fraction"] and values["warmup_steps"]:
            raise ValueError(f"{where}: warmup_steps={values['warmup_steps']} and warmup_fraction="
                             f"{values['warmup_fraction']} both set: give the warmup one way (the other 0)")
        specs[g] = GroupSpec(**values)
    return specs


class ParamGroups:
    """The resolved groups of one model: assignments, settings, and the trainable/frozen split."""

    def __init__(self, params, o: ml_collections.ConfigDict):
        self.assignments = assign_params(params, [tuple(r) for r in o.trainable])
        self.specs = group_specs(o, {a.group for a in self.assignments.values()})
        self.shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}

    def trains(self, path: Path) -> bool:
        return not self.specs[self.assignments[path].group].frozen

    @property
    def trainable_labels(self) -> dict[Path, str]:
        """Group of every parameter the optimizer sees."""
        return {p: a.group for p, a in self.assignments.items() if self.trains(p)}

    @property
    def layer_masks(self) -> dict[Path, np.ndarray]:
        """Trainable parameters stacked on a layer axis of which only some layers train: path -> bool [layers]."""
        out = {}
        for path, a in self.assignments.items():
            if a.layers is not None and self.trains(path):
                mask = np.zeros(self.shapes[path][0], bool)
                mask[a.layers] = True
                out[path] = mask
        return out

    def split(self, params) -> tuple[dict, dict]:
        """(trainable, frozen) nested dicts; gradients are taken only with respect to the first.
        A partially unfrozen stack sits whole in `trainable` (its frozen layers are masked in the optimizer)."""
        flat = traverse_util.flatten_dict(params)
        train = {k: v for k, v in flat.items() if self.trains(k)}
        frozen = {k: v for k, v in flat.items() if not self.trains(k)}
        return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)

    def table(self) -> list[dict[str, Any]]:
        """One row per group: group, params (trainable element count; frozen layers count as frozen), lr,
        weight_decay, frozen, warmup_steps, warmup_fraction, schedule."""
        counts = {g: 0 for g in self.specs}
        counts.setdefault(FROZEN, 0)
        masks = self.layer_masks
        for path, a in self.assignments.items():
            n = int(np.prod(self.shapes[path]))
            if path in masks:
                part = n // len(masks[path]) * int(masks[path].sum())
                counts[a.group] += part
                counts[FROZEN] += n - part
            else:
                counts[a.group] += n
        specs = dict(self.specs)
        if FROZEN not in specs and counts[FROZEN]:
            specs[FROZEN] = GroupSpec(0.0, 0, 0.0, 0.0, "constant", 0.0, True)
        return [dict(group=g, params=counts[g], lr=0.0 if s.frozen else s.lr,
                     weight_decay=0.0 if s.frozen else s.weight_decay, frozen=s.frozen,
                     warmup_steps=0 if s.frozen else s.warmup_steps,
                     warmup_fraction=0.0 if s.frozen else s.warmup_fraction, schedule=s.schedule)
                for g, s in specs.items() if counts[g] or g in self.specs]

    def format_table(self) -> str:
        rows = self.table()
        lines = [f"{'group':<20} {'params':>15} {'lr':>10} {'wd':>8} {'warmup':>7} {'schedule':>9} frozen"]
        lines += [f"{r['group']:<20} {r['params']:>15,} {r['lr']:>10.3g} {r['weight_decay']:>8.3g} "
                  f"{_warmup(r):>7} {r['schedule']:>9} {r['frozen']}" for r in rows]
        return "\n".join(lines)

    def write_table(self, workdir: str) -> None:
        replace_file(os.path.join(workdir, "param_groups.json"), lambda f: json.dump(self.table(), f, indent=1))


def _warmup(row: dict) -> str:
    """A table row's warmup: steps, or the share of the run."""
    return f"{100 * row['warmup_fraction']:g}%" if row["warmup_fraction"] else str(row["warmup_steps"])


def merge_params(train: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(train)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)
