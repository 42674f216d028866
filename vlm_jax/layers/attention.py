"""The one attention function every model uses.

q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]. Masking combines
  * segment ids: a query attends only to keys of the same segment, so packed examples never see each
    other (0 = padding, which then only sees padding and stays finite);
  * causality: by explicit positions when given (KV-cache decoding, where the query sits at its own
    position within a long cache), otherwise by array index.
GQA groups the H query heads into Hkv groups of H // Hkv heads sharing one k/v head (no k/v copies; see the
mesh wrapper below for the one exception).

Backends (config `model.attention`; `auto` picks the platform's kernel, `resolve_backend`):
  xla     plain XLA ops with the mask above (layers/xla_attention.py: causal self-attention a block of queries
          at a time against the keys its segments reach): CPU, tests, GPUs without the cuDNN kernel.
  cudnn   GPU (Hopper or later, bf16/fp16): the cuDNN flash kernel behind `jax.nn.dot_product_attention(
          implementation="cudnn")` in its packed form. jax 0.10.2's public signature takes one sequence length
          per row (`query_seq_lengths` [B]), not several examples per row, so the packed segments go to the same
          kernel through `jax._src.cudnn.fused_attention_stablehlo` as per-row segment lengths and offsets
          (`segment_layout`), at most `max_segments` per row, each row padded to a multiple of CUDNN_BLOCK
          tokens. Tokens outside every segment (row padding) get 0, and so do their gradients.
  splash  TPU: the Pallas splash-attention kernel with segment ids (causal or full block masks, never an
          L x L array), one kernel call per row, at any length: the wrapper pads the sequence to a multiple of
          128 tokens (blocks of 512, 256 or 128, the largest that divides; NaViT's 11672 patch slots run as
          11776 in blocks of 512, a CLIP tile's 577 tokens as 640 in blocks of 128) with segment id 0, which no
          real token has (real tokens are >= 1; a row without segment ids is all segment 1), and slices the
          output back. Head dims off the 128 lanes (64, 80, 88, 104) compile as they are. `pallas_interpreter()`
          runs the kernel's Pallas interpreter instead (CPU tests), chosen explicitly and never from the default
          backend, since TPU programs are also compiled ahead of time on CPU hosts.
Both kernels compute what the xla path computes at every token inside a segment, and both run through one
wrapper (`_sharded`): with a mesh in context (`jax.set_mesh`) a kernel cannot be partitioned by the compiler, so
it runs under `jax.shard_map`, each device on its own rows and heads. The mesh axes come from the active flax
logical rules for act_batch and act_heads, each kept where it divides the dimension (else that dimension stays
whole on every device); the length is never split. The kv heads follow the q heads' split so every device holds
whole GQA groups, repeated where the head shards do not divide them (`_sharded`). With no mesh the kernel is
called directly. Self-attention only: KV-cache decoding (explicit positions, one query per row, mask
[B, 1, cache_len]) and cross-attention (queries and keys of different lengths) keep the xla path with any backend.
"""

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax import parallel
from vlm_jax.layers import axes
from vlm_jax.layers.xla_attention import BLOCK, causal_blocks, mask, xla_attention


def segment_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Packed rows [B, L] (segments 1..k laid out contiguously from index 0, then 0 = padding) -> cuDNN's
    packed description: lengths [B, max_segments] and start offsets [B, max_segments + 1], both int32 and
    -1 past a row's last segment."""
    counts = jax.vmap(lambda s: jnp.bincount(s, length=max_segments + 1))(segment_ids)[:, 1:]
    starts = jnp.cumsum(counts, axis=1) - counts
    present = counts > 0
    lengths = jnp.where(present, counts, -1).astype(jnp.int32)
    offsets = jnp.where(present, starts, -1).astype(jnp.int32)
    return lengths, jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1)


CUDNN_BLOCK = 64  # the cudnn backend pads rows to a multiple of this many tokens


def _cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, causal: bool, max_segments: int,
) -> jax.Array:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # the packed form (module docstring)

    b, length = q.shape[:2]
    segment_ids = jnp.ones((b, length), jnp.int32) if segment_ids is None else segment_ids
    real = (segment_ids > 0)[:, :, None, None]
    # The kernel leaves the gradients of tokens outside every segment undefined (NaN on an H100), and a NaN there
    # would reach the weights through the projections' backward: `where` passes 0 to those tokens instead.
    q, k, v = (jnp.where(real, t, 0) for t in (q, k, v))
    # Training refuses some lengths (odd ones, e.g. a CLIP tile's 577 tokens): pad to CUDNN_BLOCK with segment 0.
    padded = -(-length // CUDNN_BLOCK) * CUDNN_BLOCK
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths, offsets = segment_layout(jnp.pad(segment_ids, ((0, 0), (0, padded - length))), max_segments)
    mask = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    out = cudnn.dot_product_attention(*(jnp.pad(t, pad) for t in (q, k, v)), q_seqlen=lengths, kv_seqlen=lengths,
                                      q_offsets=offsets, kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                      mask_type=mask)
    return jnp.where(real, out[:, :length], 0).astype(q.dtype)


def _sharded(
    kernel: Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array],
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
) -> jax.Array:
    """Runs a one-device kernel `(q, k, v, segment_ids) -> out` on each batch x head shard of the mesh in
    context (module docstring); with no mesh, calls it directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    # Whole rows per device (the kernel attends along the full length), so act_length's rule is not consulted.
    logical = nn.logical_to_mesh_axes((axes.ACT_BATCH, None, axes.ACT_HEADS, None))
    spec = parallel.fit_spec(logical, q.shape, mesh)
    head_axes = (spec[2],) if isinstance(spec[2], str) else spec[2] or ()
    shards = math.prod(mesh.shape[a] for a in head_axes)
    # The kernel pairs local q head i with local kv head i // (q heads per kv head), so every shard must hold
    # whole GQA groups: the kv heads split over the q heads' axes, whatever act_kv_heads maps to (that rule
    # only decides how they arrive). Where those shards do not divide the kv heads, each kv head is repeated
    # to lcm(Hkv, shards) heads so that they do; replicating the kv heads instead would give a shard kv heads
    # that belong to other shards' q heads, in the wrong place.
    repeats = shards // math.gcd(k.shape[2], shards)
    if repeats > 1:
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    # check_vma=False: Pallas kernels do not declare how their outputs vary over the mesh axes. jit: called
    # eagerly, a shard_map runs its body op by op, which the kernel's Pallas interpreter does not survive.
    shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=spec, check_vma=False)
    if segment_ids is None:
        return jax.jit(shard(lambda q, k, v: kernel(q, k, v, None), in_specs=(spec,) * 3))(q, k, v)
    return jax.jit(shard(kernel, in_specs=(spec,) * 3 + (P(spec[0]),)))(q, k, v, segment_ids)


SPLASH_BLOCKS = (512, 256, 128)  # tried in order: the largest that divides the padded sequence

_interpret = False


@contextlib.contextmanager
def pallas_interpreter() -> Iterator[None]:
    """Runs the splash kernel through its Pallas interpreter while tracing inside this context (CPU tests).
    An explicit switch, never inferred from `jax.default_backend()`: TPU programs are also compiled ahead of
    time on a CPU host, and there the real kernel must be lowered."""
    global _interpret
    previous, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = previous


# Not cached: the kernel holds its block tables as jax arrays, made in the trace that builds it (cached, they
# would leak that trace's tracers into later ones). The block tables themselves are computed once (the splash
# mask_info module keeps them in an lru_cache).
def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    one = masks.CausalMask((length, length)) if causal else masks.FullMask((length, length))
    kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    return kernel, splash.SegmentIds


def _splash_local(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, causal: bool,
) -> jax.Array:
    b, length, h, d = q.shape
    # Padding takes segment 0, which real tokens never have (a row without segment ids is all segment 1);
    # padded keys are thus invisible to real queries, and every padded query sees at least itself.
    padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    segment_ids = jnp.ones((b, length), jnp.int32) if segment_ids is None else segment_ids
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - length)))
    kernel, segments = _splash_kernel(padded, h, causal, _interpret)

    def heads_first(t: jax.Array) -> jax.Array:  # the kernel takes [heads, L, D] per row
        return jnp.swapaxes(jnp.pad(t, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)

    # The kernel does not scale the scores.
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segments(q=s, kv=s)))(
        heads_first(q * jnp.asarray(d ** -0.5, q.dtype)), heads_first(k), heads_first(v), segment_ids)
    return jnp.swapaxes(out, 1, 2)[:, :length].astype(q.dtype)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, segment_ids: jax.Array | None,
) -> jax.Array:
    """The splash backend (module docstring), at any sequence length, on any mesh."""
    return _sharded(functools.partial(_splash_local, causal=causal), q, k, v, segment_ids)


BACKENDS = ("xla", "cudnn", "splash")
# `auto`: the kernel of the platform the program is compiled for; ROCm and CPU take the masked path.
PLATFORM_BACKENDS = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """`backend`, or for "auto" the kernel of `platform` (a jax platform name; default: the default backend's).
    A program compiled ahead of time for other devices than this host's must name their platform."""
    if backend != "auto":
        return backend
    return PLATFORM_BACKENDS.get(platform or jax.default_backend(), "xla")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    backend: str = "xla",
    max_segments: int = 64,
) -> jax.Array:
    """Scaled dot-product attention with fp32 softmax; see the module docstring for the masking rules and the
    backends (`max_segments`: the cudnn backend's packed segments per row)."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("pass both q_positions and kv_positions, or neither")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads do not divide into {k.shape[2]} kv heads")
    backend = resolve_backend(backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS) + ['auto']}")
    if backend != "xla" and q_positions is None and q.shape[1] == k.shape[1]:
        if q_segment_ids is not None and q_segment_ids is not kv_segment_ids:
            raise ValueError(f"the {backend} backend takes self-attention segments (one segment_ids for q and kv)")
        if backend == "cudnn":
            return _sharded(functools.partial(_cudnn_attention, causal=causal, max_segments=max_segments),
                            q, k, v, q_segment_ids)
        return splash_attention(q, k, v, causal, q_segment_ids)
    length = q.shape[1]
    if causal and q_positions is None and length == k.shape[1] and length > BLOCK:
        return causal_blocks(q, k, v, q_segment_ids, kv_segment_ids)
    return xla_attention(q, k, v, mask(length, k.shape[1], causal, q_segment_ids, kv_segment_ids, q_positions,
                                       kv_positions))
