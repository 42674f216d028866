"""Connectors from vision tokens to the LLM width. Implemented: `mlp` (LLaVA mlp2x_gelu, XVERSE-V llama_proj,
and with `merge_size=2` the Qwen2-VL / POINTS1.5 PatchMerger)."""

import flax.linen as nn
import jax
import ml_collections

from vlm_jax.layers.mlp import MLP
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.qformer import QFormer
from vlm_jax.resampler import Resampler


class MLPProjector(nn.Module):
    """[LayerNorm (XVERSE-V ln_vision, PatchMerger ln_q)] -> [concat each run of merge_size**2 tokens] ->
    Linear(d, hidden) -> exact GELU -> Linear(hidden, out).

    hidden = `hidden_dim`, or out when 0 (LLaVA). The PatchMerger is merge_size=2 with hidden = 4 * d_vis:
    in the NaViT patch order (vlm_jax/data/navit.py) each run of 4 tokens is one 2x2 window of an image, so
    [B, N, d_vis] -> [B, N/4, out]. Tiled features are put in that window order first
    (image_inputs/tiles.py windows_first).
    """

    config: ml_collections.ConfigDict  # model.connector
    out_dim: int
    options: ModuleOptions = ModuleOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        o = self.options
        if self.config.in_norm:
            x = LayerNorm(self.config.norm_eps, name="in_norm", **o.dtypes)(x)
        group = self.config.merge_size ** 2
        if x.shape[-2] % group:
            raise ValueError(f"{x.shape[-2]} tokens do not split into runs of {group} (merge_size)")
        x = x.reshape(*x.shape[:-2], x.shape[-2] // group, group * x.shape[-1])
        hidden = self.config.hidden_dim or self.out_dim
        return MLP(hidden, "gelu", out_dim=self.out_dim, name="mlp", lora=o.lora, **o.dtypes)(x)


CONNECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector, "qformer": QFormer, "resampler": Resampler}
