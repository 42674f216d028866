"""Optimizer and parameter selection: path regex -> label tables, refusing unmatched parameters."""

import re

import ml_collections
import optax
from flax import traverse_util

FROZEN = "frozen"


def param_path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def label_params(params, rules: list[tuple[str, str]], what: str = "optim.trainable") -> dict:
    """Maps every parameter path to the label of the first rule whose regex fully matches it.

    A parameter matched by no rule, or a rule that matches no parameter, is an error: both are
    almost always a typo that would otherwise freeze or train the wrong weights silently.
    """
    flat = traverse_util.flatten_dict(params)
    compiled = [(re.compile(pattern), label) for pattern, label in rules]
    used = [False] * len(compiled)
    labels, unmatched = {}, []
    for path in flat:
        name = param_path(path)
        for i, (regex, label) in enumerate(compiled):
            if regex.fullmatch(name):
                labels[path], used[i] = label, True
                break
        else:
            unmatched.append(name)
    if unmatched:
        raise ValueError(f"{what}: no rule matches parameter(s) {unmatched[:10]}"
                         + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""))
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"{what}: rule(s) {unused} match no parameter")
    return labels


def split_params(params, labels: dict) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; gradients are taken only with respect to the first."""
    flat = traverse_util.flatten_dict(params)
    train = {k: v for k, v in flat.items() if labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(train: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(train)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(int(o.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.final_lr_ratio)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine and global-norm clipping; weight decay on matrices only."""
    def decay_mask(tree):
        # By name, not ndim: scanned layers give biases and norm scales a leading layer axis.
        return traverse_util.unflatten_dict({
            path: path[-1] in ("kernel", "embedding")
            for path in traverse_util.flatten_dict(tree)})

    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
        optax.adamw(learning_rate_schedule(o, total_steps), b1=o.b1, b2=o.b2,
                    weight_decay=o.weight_decay, mask=decay_mask))
