"""How every module of one model computes: taken from the model config once (`VLM.setup`) and passed down whole,
so the vision tower, connector and decoder (and their blocks) each hold one field instead of seven."""

import dataclasses

import jax.numpy as jnp
import ml_collections
from jax.typing import DTypeLike

from vlm_jax.layers.lora import LoraSpec


@dataclasses.dataclass(frozen=True)
class ModuleOptions:
    dtype: DTypeLike = jnp.float32  # compute dtype
    param_dtype: DTypeLike = jnp.float32  # parameter storage at init
    lora: LoraSpec | None = None  # adapters on the Dense layers it targets; None: no adapters
    scan_layers: bool = True  # layer stacks scanned (stacked parameters) or unrolled (layers_0, layers_1, ...)
    remat_policy: str = "none"  # what a layer stack recomputes in the backward pass (layers/scan.py)
    attention: str = "xla"  # the attention backend of the ViT and decoder blocks (layers/attention.py)
    max_segments: int = 64  # packed segments per row the cudnn backend holds

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> "ModuleOptions":
        """The options of model config `model` (config.model)."""
        return cls(dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype),
                   lora=LoraSpec.from_config(model.lora), scan_layers=model.scan_layers,
                   remat_policy=model.remat_policy, attention=model.attention, max_segments=model.max_segments)

    @property
    def dtypes(self) -> dict[str, DTypeLike]:
        """dtype and param_dtype, as the layers (Dense, norms, attention) take them."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)
