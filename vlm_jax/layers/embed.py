"""Token embedding table, also usable as a tied output head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from vlm_jax.layers import axes


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        # Unit scale, like the fan-in Dense outputs added to it in the residual stream (and the visual
        # tokens scattered among these rows); at 0.02 the first attention layer drowns each token's
        # own identity and from-scratch training stalls.
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), (axes.VOCAB, axes.EMBED)),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gathering the embed axis first (the FSDP all-gather) lets the lookup produce batch-sharded rows
        # instead of resharding its output. An id outside the table (an image placeholder: LLaVA's -200, or one
        # at or past the vocabulary size) is clipped to it, as numpy's mode="clip" does (negative ids read row 0,
        # not wrapping from the end; the default fills NaN): the visual tokens overwrite those rows after the
        # lookup, so which row is read never matters, and the gradient it sends that row is zero.
        table = nn.with_logical_constraint(jnp.asarray(self.embedding, self.dtype), (axes.VOCAB, None))
        return jnp.take(table, ids, axis=0, mode="clip")

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x @ embedding.T."""
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), jnp.asarray(self.embedding, self.dtype))
