"""The cudnn attention backend on a GPU against the masked xla path, and the time of each.

Numerics: packed rows (several examples per row, trailing padding, one row a single segment), GQA, causal (the
decoder) and full (a vision tower) masks, lengths on and off the 64-token grid, bf16 inputs; forward and the
gradients of a weighted sum over the real tokens. Each backend's bf16 result is compared with the xla path run in
fp32 on the same (upcast) inputs, so `err_ratio` (cudnn's error over xla-bf16's) reads 1 where the kernel is as
accurate as the masked path; cases run alone and under a one-device mesh (the shard_map wrapper).
Speed: jit(value_and_grad) of one long packed causal row per backend, median of timed repeats.

Prints one JSON line. Needs a CUDA GPU with cuDNN (the packed kernel: Hopper or later):
    python bench/gpu_attention.py [--length 8192] [--repeats 10]
"""

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import parallel
from vlm_jax.layers.attention import attention

CASES = {  # name: (rows, length, heads, kv heads, head dim, causal)
    "decoder_gqa": (4, 1024, 16, 4, 128, True),
    "decoder_off_grid": (3, 1000, 8, 8, 128, True),
    "vision_full": (4, 577, 16, 16, 64, False),
    "decoder_hd80": (2, 512, 8, 2, 80, True),
}


def packed_ids(rows: int, length: int, seed: int, segments: int = 4) -> np.ndarray:
    """Segments 1..k from index 0 in every row; even rows end in padding, row 1 is one whole segment."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), np.int32)
    for row in range(rows):
        end = length if row % 2 else int(rng.integers(length // 2, length))
        k = 1 if row == 1 else segments
        cuts = np.sort(rng.choice(np.arange(1, end), size=k - 1, replace=False))
        for s, (lo, hi) in enumerate(zip((0, *cuts), (*cuts, end)), start=1):
            ids[row, lo:hi] = s
    return ids


def loss_and_grads(backend: str, q, k, v, seg, causal: bool, weights):
    real = seg > 0

    def loss(q, k, v):
        out = attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg, backend=backend)
        return jnp.sum(jnp.where(real[:, :, None, None], out.astype(jnp.float32) * weights, 0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def max_err(got, want, real) -> float:
    return float(jnp.max(jnp.abs(jnp.where(real, got.astype(jnp.float32) - want.astype(jnp.float32), 0))))


def check(name: str, rows: int, length: int, heads: int, kv_heads: int, dim: int, causal: bool) -> dict:
    keys = jax.random.split(jax.random.key(length + heads), 4)
    q = jax.random.normal(keys[0], (rows, length, heads, dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (rows, length, kv_heads, dim), jnp.bfloat16) for key in keys[1:3])
    weights = jax.random.normal(keys[3], q.shape)
    seg = jnp.asarray(packed_ids(rows, length, seed=length))
    real = (seg > 0)[:, :, None, None]
    ref_out, ref_grads = loss_and_grads("xla", *(t.astype(jnp.float32) for t in (q, k, v)), seg, causal, weights)
    xla_out, xla_grads = loss_and_grads("xla", q, k, v, seg, causal, weights)
    result = {}
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    for where in ("alone", "mesh"):
        try:
            if where == "mesh":
                with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
                    out, grads = loss_and_grads("cudnn", q, k, v, seg, causal, weights)
            else:
                out, grads = loss_and_grads("cudnn", q, k, v, seg, causal, weights)
        except Exception as e:  # reported, not raised: the other cases still run
            result[where] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        errs = {"out": (max_err(out, ref_out, real), max_err(xla_out, ref_out, real))}
        for n, g, x, r in zip("qkv", grads, xla_grads, ref_grads):
            full = jnp.ones(g.shape, bool)  # gradients of padding are 0 in every backend
            errs[f"d{n}"] = (max_err(g, r, full), max_err(x, r, full))
        result[where] = {key: {"cudnn": round(c, 5), "xla_bf16": round(x, 5), "err_ratio": round(c / max(x, 1e-9), 3)}
                         for key, (c, x) in errs.items()}
    return result


def time_backend(backend: str, length: int, repeats: int) -> float:
    heads, kv_heads, dim = 32, 8, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, length, heads, dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, length, kv_heads, dim), jnp.bfloat16) for key in keys[1:3])
    seg = jnp.asarray(packed_ids(1, length, seed=1, segments=8))

    def loss(q, k, v):
        out = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, backend=backend)
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for _ in range(3):
        jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "cases": {name: check(name, *shape) for name, shape in CASES.items()}}
    timing = {}
    for backend in ("xla", "cudnn"):
        try:
            timing[f"{backend}_s"] = round(time_backend(backend, args.length, args.repeats), 6)
        except Exception as e:
            timing[f"{backend}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if "xla_s" in timing and "cudnn_s" in timing:
        timing["cudnn_speedup"] = round(timing["xla_s"] / timing["cudnn_s"], 2)
    out["fwd_bwd_one_row"] = dict(length=args.length, heads=32, kv_heads=8, head_dim=128, segments=8, **timing)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
