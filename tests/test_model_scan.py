import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.test_model_vlm import forward_args, random_params, tiny_batch, tiny_model_config
from vlm_jax.layers import axes
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.model import VLM
from vlm_jax.text.decoder import Decoder
from vlm_jax.vision.vit import ViT

PARAM_NAMES = {axes.EMBED, axes.MLP, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM, axes.VOCAB, axes.LAYERS,
               axes.PATCH, axes.NORM, None}


def _unstack(tree: dict) -> dict:
    """Scanned layout (`layers` with a leading layer axis) -> unrolled layout (`layers_0`, `layers_1`, ...)."""
    out = {}
    for key, value in tree.items():
        if key == "layers":
            n = jax.tree.leaves(value)[0].shape[0]
            out.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], value) for i in range(n)})
        elif isinstance(value, dict):
            out[key] = _unstack(value)
        else:
            out[key] = value
    return out


def _apply(model: VLM, params: dict, batch: dict) -> jax.Array:
    return jax.jit(lambda p: model.apply({"params": p}, *forward_args(batch)))(params)


def test_scan_and_unrolled_give_identical_logits():
    batch = tiny_batch()
    scanned = VLM(tiny_model_config(scan_layers=True))
    params = random_params(scanned, *forward_args(batch))
    unrolled = VLM(tiny_model_config(scan_layers=False))
    flat = _unstack(params)
    expected = jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(unrolled.init, jax.random.key(0),
                                                                     *forward_args(batch))["params"]))
    assert jax.tree.map(jnp.shape, flat) == expected
    # Equal up to fp32 reassociation between the two compiled programs.
    np.testing.assert_allclose(np.asarray(_apply(unrolled, flat, batch)), np.asarray(_apply(scanned, params, batch)),
                               rtol=1e-5, atol=1e-5)


@functools.cache
def _decoder_loss_and_grads(remat_policy: str) -> tuple:
    cfg, batch = tiny_model_config().text, tiny_batch()
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    params = random_params(Decoder(cfg), *args)
    dec = Decoder(cfg, ModuleOptions(remat_policy=remat_policy))

    def loss(p: dict) -> jax.Array:
        return jnp.mean(dec.apply({"params": p}, *args) ** 2)

    # The remat must really be in the program, not silently dropped.
    assert ("remat" in str(jax.make_jaxpr(loss)(params))) == (remat_policy != "none")
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_attention"])
def test_remat_policies_do_not_change_outputs_or_grads(policy):
    (v0, g0), (v1, g1) = _decoder_loss_and_grads("none"), _decoder_loss_and_grads(policy)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


def test_dots_attention_keeps_the_attention_output(capsys):
    """"dots_attention" keeps one [layers, B, L, H, D] array more than "dots" for the backward pass, each layer's
    attention output (q_proj's output is the other of that shape), so the attention is not run again."""
    cfg, batch = tiny_model_config().text, tiny_batch()
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    params = random_params(Decoder(cfg), *args)
    shape = f"f32[{cfg.layers},{','.join(map(str, batch['tokens'].shape))},{cfg.heads},{cfg.head_dim}]"
    kept = {}
    for policy in ("dots", "dots_attention"):
        decoder = Decoder(cfg, ModuleOptions(remat_policy=policy))
        jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.mean(decoder.apply({"params": p}, *args) ** 2), params)
        kept[policy] = capsys.readouterr().out.count(shape + " ")
    assert kept == {"dots": 1, "dots_attention": 2}


def test_unknown_remat_policy_is_an_error():
    batch = tiny_batch()
    with pytest.raises(ValueError, match="remat_policy"):
        decoder = Decoder(tiny_model_config().text, ModuleOptions(remat_policy="sometimes"))
        jax.eval_shape(decoder.init, jax.random.key(0), batch["tokens"], batch["positions"], batch["segment_ids"])


def test_traced_program_does_not_grow_with_depth():
    batch = tiny_batch()

    def size(layers: int, depth: int) -> int:
        cfg = tiny_model_config()
        cfg.text.layers, cfg.vision.depth = layers, depth
        model = VLM(cfg)
        params = jax.eval_shape(model.init, jax.random.key(0), *forward_args(batch))["params"]
        return len(jax.make_jaxpr(lambda p: model.apply({"params": p}, *forward_args(batch)))(params).eqns)

    assert size(2, 3) == size(6, 9)


def test_every_param_has_logical_names_and_scan_adds_layers():
    batch = tiny_batch()
    boxed = jax.eval_shape(VLM(tiny_model_config()).init, jax.random.key(0), *forward_args(batch))["params"]
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, v: isinstance(v, nn.LogicallyPartitioned))
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= PARAM_NAMES, (path, leaf.names)
        assert (leaf.names[0] == axes.LAYERS) == ("layers" in path), (path, leaf.names)


def test_vit_and_decoder_unrolled_have_no_layers_axis():
    cfg = tiny_model_config()
    tiles = jnp.zeros((1, 28, 28, 3))
    vit = jax.eval_shape(ViT(cfg.vision, ModuleOptions(scan_layers=False)).init, jax.random.key(0), tiles)["params"]
    assert set(vit) == {"stem", "layers_0", "layers_1"}
    assert vit["layers_0"]["attn"]["q_proj"]["kernel"].names == (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
