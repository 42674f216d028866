"""What a resumed run must share with the run that saved its checkpoint: the config, key by key, and the shape of
the saved state.

Every config key that changes what the run computes must equal the saved one; FREE lists the keys that only change
how it runs, so a key added to the schema later is compared unless it is put here. `allow_changes` names keys or
sections whose differences the user means: they are logged and the run goes on under the given values (its next
checkpoints save them). A change that alters the saved state's tree or shapes (a bigger model, other trained
parameters, another optimizer) cannot resume even when allowed: a new workdir starts from this one instead."""

import json
import logging
from collections.abc import Callable

import jax
import ml_collections

from vlm_jax.config import allowed_changes, to_json
from vlm_jax.errors import InputError

FREE = (
    "allow_changes",  # what this run accepts, not what it computes
    "mesh",  # the same global batch and step on any layout (rounding of the reductions aside)
    # The memory knob of the accelerator the run resumes on: the same token-weighted mean loss and gradients as one
    # pass (rounding aside; LoRA dropout masks are drawn per micro-batch, random either way).
    "micro_batches",
    "log_every", "checkpoint_every", "keep_checkpoints",
    "eval_batch_size", "eval_examples", "max_new_tokens", "data.eval_path", "data.num_eval",  # evaluation only
    "eval_every", "eval_benchmark", "eval_metric",
    "vision_pretrain.eval_images",  # the demo's stage-0 report
    "data.workers", "data.threads", "data.prefetch",  # processes, threads, queue depth: the batches are the same
    # A run that met an over-long example or a bad record stopped there; switching these is how it goes on past it
    # (skip mode keeps bad records in the record list, so the stream's indices and shuffle are the same).
    "data.skip_too_long", "data.on_bad_record", "data.max_bad_fraction",
    "optim.max_skipped_steps",  # when a diverging run gives up, not what a step computes
    # Kernels of the same attention (the platform's: a run may resume on another one) and its capacity.
    "model.attention", "model.max_segments",
    # Recomputation and chunking of the same values. model.scan_layers is compared: it changes the parameter tree.
    "model.remat_policy", "model.loss_chunk_tokens",
)


def _flat(config: ml_collections.ConfigDict) -> dict:
    """Dotted key -> value of every leaf, in JSON form (tuples as lists), parameter groups included."""
    def walk(tree: dict, prefix: str) -> dict:
        out = {}
        for key, value in tree.items():
            out.update(walk(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    return walk(json.loads(to_json(config)), "")


def _covers(names: list[str], key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def config_changes(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict) -> dict[str, tuple]:
    """Dotted key -> (saved value, given value) of every compared key (not FREE) that differs; a key only one of
    them has (a parameter group) has None on the other side."""
    a, b = _flat(saved), _flat(given)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _covers(list(FREE), k)}


def state_mismatch(saved, given) -> list[str]:
    """How the abstract state `given` (a pytree of shaped leaves) differs from `saved` in tree or shapes: leaves of
    other shapes, and leaves one has and the other lacks. Dtypes may differ: a restore casts."""
    def shapes(tree) -> dict[str, tuple]:
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    a, b = shapes(saved), shapes(given)
    out = ([f"{k}: saved {a[k]}, given {b[k]}" for k in a if k in b and a[k] != b[k]]
           + [f"{k}: saved {a[k]}, given none" for k in a if k not in b]
           + [f"{k}: saved none, given {b[k]}" for k in b if k not in a])
    return sorted(out, key=lambda line: not line.startswith("['params']"))  # the parameters first, if any


def check_resume(given: ml_collections.ConfigDict, saved: ml_collections.ConfigDict, workdir: str, step: int,
                 saved_state: Callable[[ml_collections.ConfigDict], object], given_state: object) -> None:
    """Refuses, with one error listing every differing key, to resume the step-`step` checkpoint of `workdir` saved
    under `saved` with the config `given`, unless `given.allow_changes` covers each difference and the state the
    saved config builds (`saved_state(config)`, abstract) has the tree and shapes of `given_state`. Logs the
    accepted differences."""
    changes = config_changes(saved, given)
    if not changes:
        return
    allowed = allowed_changes(given)

    def describe(key: str) -> str:
        old, new = changes[key]
        if key == "total_steps" and given.data.epochs:  # the count is deterministic: its inputs changed
            return (f"total_steps: data.epochs={given.data.epochs} now counts {new} steps, but the run in {workdir} "
                    f"was planned at {old}: its data or packing settings changed")
        return f"{key}: {old!r} saved, {new!r} given"

    refused = [k for k in changes if not _covers(allowed, k)]
    with_mesh = saved.copy_and_resolve_references()
    with_mesh.mesh = given.mesh  # the layout is free; the state's tree and shapes are not
    mismatch = state_mismatch(saved_state(with_mesh), given_state)
    if mismatch:
        shown = "; ".join(mismatch[:3]) + (f"; and {len(mismatch) - 3} more" if len(mismatch) > 3 else "")
        raise InputError(
            f"cannot resume {workdir} from step {step}: the config differs from the one it saved in "
            f"{'; '.join(describe(k) for k in changes)}, which changes the saved state's parameters or optimizer "
            f"state ({shown}), so no allow_changes can resume it; start a new workdir from this one with "
            f"--config.init_params={workdir}@{step} (its parameters, a fresh optimizer)")
    if refused:
        raise InputError(
            f"cannot resume {workdir} from step {step}: the config differs from the one it saved in "
            f"{'; '.join(describe(k) for k in refused)}; to go on under the given values, add "
            f"--config.allow_changes={','.join(refused)}")
    for key in changes:
        logging.info("allow_changes: %s", describe(key))
