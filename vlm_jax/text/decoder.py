"""One pre-norm decoder-only LLM covering LLaMA and Qwen2 shapes by config (`model.text`).

`rope_kind="mrope"` with `mrope_sections` is Qwen2-VL's multimodal RoPE: positions [B, L, 3]
(temporal, row, col; the three equal on text), layers/rope.py. KV-cache decoding takes each token's cache slot
apart from its positions (layers/self_attention.py).

Parameter tree: `embed_tokens/embedding`, `layers` (scanned) or `layers_{i}`, each with `input_norm`,
`attn/{q,k,v,o}_proj`, `post_attn_norm`, `mlp/{gate,up,down}_proj`; `final_norm`; `lm_head` unless tied.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers import axes
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.embed import Embed
from vlm_jax.layers.lora import LORA_A, LORA_B
from vlm_jax.layers.mlp import SwiGLU
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.layers.scan import run_blocks
from vlm_jax.layers.self_attention import SelfAttention
from vlm_jax.layers import loss


class DecoderBlock(nn.Module):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rms_eps: float
    rope_base: float
    qkv_bias: bool
    rope_kind: str = "1d"
    rope_sections: tuple[int, ...] = ()
    cache_mode: str = "none"
    cache_len: int = 0
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
        cache_slots: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        o = self.options
        h = RMSNorm(self.rms_eps, name="input_norm", **o.dtypes)(x)
        x = x + SelfAttention(
            self.heads, self.kv_heads, self.head_dim, causal=True, qkv_bias=self.qkv_bias,
            rope_base=self.rope_base, rope_kind=self.rope_kind, rope_sections=self.rope_sections,
            cache_mode=self.cache_mode, cache_len=self.cache_len, backend=o.attention,
            max_segments=o.max_segments, name="attn", lora=o.lora, **o.dtypes,
        )(h, positions, segment_ids, cache_slots=cache_slots)
        h = RMSNorm(self.rms_eps, name="post_attn_norm", **o.dtypes)(x)
        x = x + SwiGLU(self.ffn, name="mlp", lora=o.lora, **o.dtypes)(h)
        return nn.with_logical_constraint(x, axes.BLE), None


class Decoder(nn.Module):
    config: ml_collections.ConfigDict  # model.text
    options: ModuleOptions = ModuleOptions()

    def setup(self) -> None:
        c, o = self.config, self.options
        self.embed_tokens = Embed(c.vocab_size, c.hidden, **o.dtypes)
        self.final_norm = RMSNorm(c.rms_eps, **o.dtypes)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, (axes.EMBED, axes.VOCAB), lora=o.lora, **o.dtypes)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> embeddings [B, L, hidden]."""
        return nn.with_logical_constraint(self.embed_tokens(tokens), axes.BLE)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [B, L, hidden] -> fp32 logits [B, L, vocab]."""
        out = self.embed_tokens.attend(h) if self.config.tie_embeddings else self.lm_head(h)
        return nn.with_logical_constraint(out.astype(jnp.float32), axes.BLV)

    def token_nll(self, h: jax.Array, targets: jax.Array) -> jax.Array:
        """Final hidden states [B, L, hidden] and target ids [B, L] -> per-token fp32 NLL [B, L] of `logits`."""
        return loss.token_nll(self.logits(h), targets)

    def loss(self, h: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
        """The training loss: (sum of `weights` x NLL of `targets`, per-token fp32 NLL [B, L] without a gradient and
        NaN where the weight is 0), the logits of `chunk` positions of each device's rows at a time with their
        gradients in the same pass, positions of weight 0 skipped (layers/loss.py chunked_loss); 0, or a chunk that covers the
        row: `logits` at once, through autodiff. The
        chunks compute what `logits` does: lm_head (with its LoRA adapter, whose dropout mask is drawn here rather
        than in the Dense) or the tied embedding."""
        if chunk < 0:
            raise ValueError(f"model.loss_chunk_tokens must be >= 0 (0: every position at once), got {chunk}")
        if not chunk or chunk >= h.shape[1]:
            nll = self.token_nll(h, targets)
            return loss.masked_sum(nll, weights)[0], jax.lax.stop_gradient(jnp.where(weights != 0, nll, jnp.nan))
        dtype, adapter = self.options.dtype, self.options.lora
        acts = {"x": h.astype(dtype)}
        # Each output matrix enters as [hidden, vocab] with its transpose beside it (loss.matmul_t): the tied table
        # [vocab, hidden] transposed once for the forward products, a kernel once for the backward ones.
        if self.config.tie_embeddings:
            table = jnp.asarray(self.embed_tokens.embedding, dtype)
            params, table_t = {"table": jax.lax.optimization_barrier(table.T)}, jax.lax.stop_gradient(table)

            def project(a, p):
                return loss.matmul_t(a["x"], p["table"], table_t)
        else:
            stored = nn.unbox(self.lm_head.variables["params"])
            params = {"kernel": jnp.asarray(stored["kernel"], dtype)}
            kernel_t = loss.transposed(params["kernel"])
            lora = adapter is not None and adapter.applies_to("/".join(self.lm_head.path))
            if lora:
                # The adapter's x @ A is one [B, L, rank] product outside the chunks; only x A B goes by chunk.
                dropped = h
                if adapter.dropout and self.has_rng("dropout"):
                    dropped = nn.Dropout(adapter.dropout, deterministic=False, parent=None).apply(
                        {}, h, rngs={"dropout": self.make_rng("dropout")})
                acts["xa"] = jnp.einsum("...e,er->...r", dropped.astype(dtype), jnp.asarray(stored[LORA_A], dtype))
                params["lora_b"] = jnp.asarray(stored[LORA_B], dtype)

            def project(a, p):
                y = loss.matmul_t(a["x"], p["kernel"], kernel_t)
                if lora:
                    y = y + (adapter.scale * jnp.einsum("...r,rv->...v", a["xa"], p["lora_b"])).astype(dtype)
                return y

        def logits(a, p):
            return nn.with_logical_constraint(project(a, p), axes.BLV)
        return loss.chunked_loss(logits, acts, params, targets, weights, self.config.vocab_size, chunk)

    @nn.compact
    def hidden_states(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
        cache_mode: str = "none", cache_len: int = 0, cache_slots: jax.Array | None = None,
    ) -> jax.Array:
        """Input embeddings [B, L, hidden] -> final-normed hidden states. See SelfAttention for the cache
        (`cache_slots` [B, 1]: decode only)."""
        c, o = self.config, self.options
        block = dict(
            hidden=c.hidden, heads=c.heads, kv_heads=c.kv_heads, head_dim=c.head_dim, ffn=c.ffn,
            rms_eps=c.rms_eps, rope_base=c.rope_base, qkv_bias=c.qkv_bias, rope_kind=c.rope_kind,
            rope_sections=tuple(c.mrope_sections), cache_mode=cache_mode, cache_len=cache_len, options=o)
        # Remat only saves memory for a backward pass; generation has none.
        remat = o.remat_policy if cache_mode == "none" else "none"
        x = run_blocks(DecoderBlock, block, x, positions, segment_ids, cache_slots, num_layers=c.layers,
                       scan=o.scan_layers, remat_policy=remat)
        return self.final_norm(x)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """Text-only language model: tokens [B, L] -> fp32 logits [B, L, vocab]."""
        return self.logits(self.hidden_states(self.embed(tokens), positions, segment_ids))
