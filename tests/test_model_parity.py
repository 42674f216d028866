"""fp32 parity against tiny random HF/PyTorch models through the real import tables (vlm_jax/interop):
RoPE convention, norms, GELU exactness, GQA, biases, packed rows."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs.base import get_config
from tests.helpers import randomize_torch, save_torch_model
from vlm_jax import parallel
from vlm_jax.interop.hf_import import Source, import_params, model_config
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.params import unflat
from vlm_jax.text.decoder import Decoder
from vlm_jax.vision.vit import ViT


def _imported(path: str, **vision) -> tuple:
    """(model config, params) of the HF checkpoint at `path`, with `vision` overriding model.vision."""
    source = Source(path)
    model = model_config([source], get_config().model, "float32")
    model.vision.update(vision)
    return model, unflat(import_params([source], model, parallel.make_mesh(get_config().mesh)))


@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_clip_vit_matches_hf_hidden_state(tmp_path, feature_layer):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    randomize_torch(hf, seed=0)
    model, params = _imported(save_torch_model(hf, tmp_path), feature_layer=feature_layer)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:].numpy()

    vit = ViT(model.vision, ModuleOptions(scan_layers=True))
    got = vit.apply({"params": params["vision"]}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    assert got.shape == want.shape == (2, 16, 32)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
             tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_matches_hf_logits_including_packed_rows(tmp_path, family):
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, head_dim=8)).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    randomize_torch(hf, seed=2)
    model, params = _imported(save_torch_model(hf, tmp_path))
    assert model.text.rope_base == 500.0 and model.text.qkv_bias == (family == "qwen2")
    dec = Decoder(model.text, ModuleOptions(scan_layers=True))

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(input_ids=ids).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    dec_params = params["decoder"]
    got = dec.apply({"params": dec_params}, jnp.asarray(ids.numpy()), positions, jnp.ones((2, 10), jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    # Both rows packed into one row (positions restart, segment ids separate them) give the same logits.
    packed = jnp.asarray(ids.numpy().reshape(1, 20))
    got = dec.apply({"params": dec_params}, packed, jnp.tile(jnp.arange(10), 2)[None],
                    jnp.repeat(jnp.asarray([1, 2]), 10)[None])
    np.testing.assert_allclose(np.asarray(got).reshape(2, 10, 97), want, atol=1e-5, rtol=0)

