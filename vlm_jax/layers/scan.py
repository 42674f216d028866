"""Run a stack of identical blocks, scanned (params/cache stacked on a `layers` axis) or unrolled,
optionally under rematerialisation. Shared by the ViT and the decoder."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from vlm_jax.layers import axes

ATTENTION_OUT = "attention_out"  # checkpoint name of a self-attention's output, before its output projection
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
    # "dots" and the attention's output (`ATTENTION_OUT`), so that the backward pass does not run the attention
    # forward again only to get the output projection's input: one [B, L, H x D] more a layer.
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)),
}


def run_blocks(
    block_cls: type[nn.Module],
    block_kwargs: dict[str, Any],
    x: jax.Array,
    *args: Any,
    num_layers: int,
    scan: bool,
    remat_policy: str,
    name: str = "layers",
) -> jax.Array:
    """Apply `num_layers` blocks `block_cls(**block_kwargs)(x, *args) -> (x, None)` in sequence.

    Call from inside a compact method: the blocks become children of the calling module, named `name`
    (scanned, every leaf with a leading `layers` axis) or `name_0`, `name_1`, ... (unrolled). `args` are
    shared by every block.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if num_layers == 0:
        return x
    if remat_policy != "none":
        # Under scan each iteration is its own computation, so CSE cannot undo the remat.
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )
        x, _ = stack(**block_kwargs, name=name)(x, *args)
        return x
    for i in range(num_layers):
        x, _ = block_cls(**block_kwargs, name=f"{name}_{i}")(x, *args)
    return x
