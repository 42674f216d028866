"""The splash attention kernel compiled ahead of time for a multi-chip TPU mesh at the real models' shapes, forward
and backward, with the compiler's temporary memory per device, against the xla backend. Prints one JSON line.

  python bench/splash_aot.py [--topology v5p:2x2x2 --mesh 1,8,1]

No TPU needed (libtpu describes the topology: requirements-plan.txt). bf16 q/k/v, gradients of their attention's
sum, under `jax.set_mesh` and the project's logical rules, as the train step runs them. Shapes: the NaViT tower
(POINTS1.5: 11672 patch slots, 16 heads of 80, bidirectional, packed), the decoder (4096 tokens, 28 q heads over
4 kv heads of 128, causal, packed) and a CLIP tile (577 tokens, 16 heads of 64, bidirectional, no segment ids).
The xla backend at the NaViT shape may not fit the chip at all; then its entry is the compiler's message.
"""

import argparse
import json
import os

# (batch, length, heads, kv heads, head dim, causal, segment ids)
SHAPES = {
    "navit": (8, 11672, 16, 16, 80, False, True),
    "decoder": (8, 4096, 28, 4, 128, True, True),
    "clip_tile": (16, 577, 16, 16, 64, False, False),
}


def _temp_bytes(mesh, backend: str, b: int, length: int, h: int, hkv: int, d: int, causal: bool,
                segments: bool) -> int | str:
    """The compiled step's temporary bytes per device, or the compiler's first line when it refuses."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlm_jax import parallel
    from vlm_jax.layers.attention import attention

    def grads(q, k, v, seg):
        def total(q, k, v):
            out = attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg, backend=backend)
            return out.astype(jnp.float32).sum()
        return jax.grad(total, argnums=(0, 1, 2))(q, k, v)

    q, kv = (jax.ShapeDtypeStruct((b, length, heads, d), jnp.bfloat16) for heads in (h, hkv))
    seg = jax.ShapeDtypeStruct((b, length), jnp.int32) if segments else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        lowered = jax.jit(grads).lower(q, kv, kv, seg)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            return str(e).splitlines()[0]
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes over the topology's devices")
    a = p.parse_args()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server on a CPU host
    import jax
    import numpy as np
    from jax.experimental import topologies

    from vlm_jax import parallel

    devices = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices
    sizes = tuple(int(s) for s in a.mesh.split(","))
    if len(sizes) != len(parallel.MESH_AXES) or np.prod(sizes) != len(devices):
        raise SystemExit(f"--mesh {a.mesh}: expected {len(parallel.MESH_AXES)} sizes whose product is "
                         f"{len(devices)} ({a.topology})")
    mesh = jax.sharding.Mesh(np.array(devices).reshape(sizes), parallel.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
    result = {name: {"splash_temp_bytes": _temp_bytes(mesh, "splash", *shape)} for name, shape in SHAPES.items()}
    result["navit"]["xla_temp_bytes"] = _temp_bytes(mesh, "xla", *SHAPES["navit"])
    print(json.dumps(dict(topology=a.topology, mesh=dict(zip(parallel.MESH_AXES, sizes)), **result)))


if __name__ == "__main__":
    main()
