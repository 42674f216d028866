"""Model soup (POINTS1.5, `wepoints.utils.model_soup`): the element-wise weighted average of several
checkpoints of one model, written as a checkpoint directory (vlm_jax/checkpoints/directory.py) that a run starts
from (`--config.init_params`), `launch/eval.py --params` evaluates and `launch/convert.py export` exports.

Sources are training workdirs (their latest checkpoint, or `WORKDIR@STEP`) or checkpoint directories. The
soup keeps the first source's provenance (ids, source configs) and carried tensors (the source tensors the
model does not compute with, which no run changes); sources whose carried tensors differ, in bytes, are refused:
they did not start from one checkpoint, and no one set of them belongs to the average.
"""

import filecmp
import os
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.checkpoints.directory import RECORD_DIR, extra_file, load_params, write_checkpoint_dir


def check_compatible(first: dict[str, jax.Array], other: dict[str, jax.Array], where: str) -> None:
    """Same leaf paths, shapes and dtypes, else an error listing each difference."""
    problems = [f"missing {k}" for k in sorted(set(first) - set(other))]
    problems += [f"unexpected {k}" for k in sorted(set(other) - set(first))]
    problems += [f"{k}: {other[k].dtype}{list(other[k].shape)}, expected {first[k].dtype}{list(first[k].shape)}"
                 for k in sorted(set(first) & set(other))
                 if other[k].shape != first[k].shape or other[k].dtype != first[k].dtype]
    if problems:
        raise ValueError(f"{where} does not have the structure of the first source:\n  " + "\n  ".join(problems))


def soup(sources: list[str], dst: str, mesh, weights: list[float] | None = None) -> dict[str, Any]:
    """Writes the weighted average (fp32 accumulation, stored in each leaf's dtype) of `sources` to `dst`,
    loading one source at a time. Weights default to uniform and are normalised to sum to 1."""
    if not sources:
        raise ValueError("soup needs at least one source")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"soup: {len(sources)} sources need as many non-negative weights, got {weights}")
    total = sum(weights)
    extra = extra_file(sources[0])
    for src in sources[1:]:
        other = extra_file(src)
        if (extra is None) != (other is None) or extra and not filecmp.cmp(extra, other, shallow=False):
            raise ValueError(f"soup: {src} carries other source tensors ({other}) than {sources[0]} ({extra}); "
                             "soup checkpoints that started from the same import")
    acc, first, meta = None, None, None

    @jax.jit
    def add(acc, x, w):
        return jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), acc, x)

    for src, w in zip(sources, weights):
        params, src_meta = load_params(src, mesh)
        if first is None:
            first, meta = {k: (v.shape, v.dtype) for k, v in params.items()}, src_meta
            acc = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32, device=v.sharding), params)
        else:
            check_compatible({k: jax.ShapeDtypeStruct(*s) for k, s in first.items()}, params, src)
        acc = add(acc, params, w / total)
        del params
    out = {k: v.astype(first[k][1]) for k, v in acc.items()}
    meta = dict(meta, family=meta.get("family", "vlm_jax"), soup=dict(sources=sources, weights=weights))
    write_checkpoint_dir(dst, out, meta, tokenizer_from=os.path.join(sources[0], RECORD_DIR), extra_from=sources[0])
    return meta
