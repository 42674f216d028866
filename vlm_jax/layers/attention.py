"""The one attention function every model uses.

q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]. Masking combines
  * segment ids: a query attends only to keys of the same segment, so packed examples never see each
    other (0 = padding, which then only sees padding and stays finite);
  * causality: by explicit positions when given (KV-cache decoding, where the query sits at its own
    position within a long cache), otherwise by array index.
GQA groups the H query heads into Hkv groups of H // Hkv heads sharing one k/v head (no k/v copies).

Backends (config `model.attention`):
  xla     the explicit [B, Lq, Lk] mask above: CPU and tests.
  cudnn   GPU (Hopper or later, bf16/fp16): the cuDNN flash kernel behind `jax.nn.dot_product_attention(
          implementation="cudnn")` in its packed form. jax 0.10.2's public signature takes one sequence length
          per row (`query_seq_lengths` [B]), not several examples per row, so the packed segments go to the same
          kernel through `jax._src.cudnn.fused_attention_stablehlo` as per-row segment lengths and offsets
          (`segment_layout`), at most `max_segments` per row. Tokens outside every segment (row padding) get 0.
  splash  TPU: the Pallas splash-attention kernel with segment ids (causal or full block masks, never an
          L x L array), one kernel call per row. Its blocks are multiples of 128 tokens, so a sequence of another
          length (a CLIP tile's 257 tokens: a small mask) takes the xla path.
Both kernels compute what the xla path computes at every token inside a segment. Self-attention only: KV-cache
decoding (explicit positions, one query per row, mask [B, 1, cache_len]) and cross-attention (no mask) keep
the xla path.
"""

import functools

import jax
import jax.numpy as jnp


def _mask(
    lq: int, lk: int, causal: bool,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
    q_positions: jax.Array | None, kv_positions: jax.Array | None,
) -> jax.Array | None:
    """[B or 1, Lq, Lk] boolean, True where attention is allowed; None when everything is allowed."""
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        if q_positions is None:
            q_positions, kv_positions = jnp.arange(lq)[None], jnp.arange(lk)[None]
        order = kv_positions[:, None, :] <= q_positions[:, :, None]
        mask = order if mask is None else mask & order
    return mask


def _xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
) -> jax.Array:
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:
        # A finite fill keeps fully-masked rows (padding) uniform instead of NaN.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, h, d)


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


def _cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, segment_ids: jax.Array | None, max_segments: int,
) -> jax.Array:
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # the packed form (module docstring)

    lengths, offsets = segment_layout(segment_ids, max_segments)
    mask = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    out = cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                      kv_offsets=offsets, scale=q.shape[-1] ** -0.5, mask_type=mask)
    return jnp.where((segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)


SPLASH_BLOCKS = (512, 256, 128)  # tried in order: the largest that divides the sequence


@functools.cache
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


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, segment_ids: jax.Array | None,
    interpret: bool = False,
) -> jax.Array:
    """The splash backend (module docstring); `interpret` runs the kernel's Pallas interpreter (CPU tests)."""
    b, length, h, d = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, length), jnp.int32)
    kernel, segments = _splash_kernel(length, h, causal, interpret)
    # The kernel takes [heads, L, D] per row and does not scale the scores.
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segments(q=s, kv=s)))(
        heads_first(q * jnp.asarray(d ** -0.5, q.dtype)), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out).astype(q.dtype)


BACKENDS = ("xla", "cudnn", "splash")


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
    if backend != "xla" and q_positions is None and q.shape[1] == k.shape[1]:
        if q_segment_ids is not None and q_segment_ids is not kv_segment_ids:
            raise ValueError(f"the {backend} backend takes self-attention segments (one segment_ids for q and kv)")
        if backend == "cudnn":
            return _cudnn_attention(q, k, v, causal, q_segment_ids, max_segments)
        if q.shape[1] % SPLASH_BLOCKS[-1] == 0:
            return splash_attention(q, k, v, causal, q_segment_ids)
    mask = _mask(q.shape[1], k.shape[1], causal, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    return _xla_attention(q, k, v, mask)
