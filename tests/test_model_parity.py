"""fp32 parity against tiny random HF/PyTorch models: RoPE convention, norms, GELU exactness, GQA, biases.

The name mappings here are deliberately local and minimal; the real import tables live in vlm_jax/interop.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.text.decoder import Decoder
from vlm_jax.vision.vit import ViT


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace HF's tiny default init with O(1) activations so the comparison is not trivially small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name and "patch" not in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _stack(layers: list[dict]) -> dict:
    """Per-layer param dicts -> one dict with a leading layer axis (the scanned layout)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def _proj(lin: torch.nn.Linear, heads: int, out: bool = False) -> dict:
    """torch Linear [out, in] -> Dense kernel [E, heads, D] (q/k/v) or [heads, D, E] (o)."""
    w = _np(lin.weight).T
    if out:
        p = {"kernel": w.reshape(heads, -1, w.shape[1])}
        if lin.bias is not None:
            p["bias"] = _np(lin.bias)
    else:
        p = {"kernel": w.reshape(w.shape[0], heads, -1)}
        if lin.bias is not None:
            p["bias"] = _np(lin.bias).reshape(heads, -1)
    return p


def _linear(lin: torch.nn.Linear) -> dict:
    p = {"kernel": _np(lin.weight).T}
    if lin.bias is not None:
        p["bias"] = _np(lin.bias)
    return p


def _ln(norm: torch.nn.Module) -> dict:
    p = {"scale": _np(norm.weight)}
    if getattr(norm, "bias", None) is not None:
        p["bias"] = _np(norm.bias)
    return p


# ---------------------------------------------------------------------------------------------- CLIP


def _clip_params(hf: transformers.CLIPVisionModel, heads: int, num_blocks: int) -> dict:
    vm = hf  # transformers 5 flattens CLIPVisionModel (no `.vision_model` attribute)
    conv = _np(vm.embeddings.patch_embedding.weight)
    stem = {
        "patch_embed": {"kernel": conv.reshape(conv.shape[0], -1).T},
        "cls_token": _np(vm.embeddings.class_embedding),
        "pos_embed": _np(vm.embeddings.position_embedding.weight),
        "pre_norm": _ln(vm.pre_layrnorm),
    }
    layers = []
    for layer in vm.encoder.layers[:num_blocks]:
        a = layer.self_attn
        layers.append({
            "norm1": _ln(layer.layer_norm1), "norm2": _ln(layer.layer_norm2),
            "attn": {"q_proj": _proj(a.q_proj, heads), "k_proj": _proj(a.k_proj, heads),
                     "v_proj": _proj(a.v_proj, heads), "o_proj": _proj(a.out_proj, heads, out=True)},
            "mlp": {"fc1": _linear(layer.mlp.fc1), "fc2": _linear(layer.mlp.fc2)},
        })
    return {"stem": stem, "layers": _stack(layers)}


@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_clip_vit_matches_hf_hidden_state(feature_layer):
    cfg = ml_collections.ConfigDict(dict(
        stem="clip", image_size=28, patch_size=7, width=32, depth=3, heads=4, mlp_dim=64,
        mlp_act="quick_gelu", norm_eps=1e-5, pre_norm=True, feature_layer=feature_layer, drop_cls=True))
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    _randomize(hf, seed=0)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _np(hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:])

    vit = ViT(cfg, scan_layers=True)
    params = _clip_params(hf, heads=4, num_blocks=vit.num_blocks)
    got = vit.apply({"params": params}, jnp.asarray(_np(pixels).transpose(0, 2, 3, 1)))
    assert got.shape == want.shape == (2, 16, 32)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- LLaMA / Qwen2


def _decoder_params(hf: transformers.PreTrainedModel, heads: int, kv_heads: int) -> dict:
    m = hf.model
    layers = []
    for layer in m.layers:
        a, f = layer.self_attn, layer.mlp
        layers.append({
            "input_norm": _ln(layer.input_layernorm), "post_attn_norm": _ln(layer.post_attention_layernorm),
            "attn": {"q_proj": _proj(a.q_proj, heads), "k_proj": _proj(a.k_proj, kv_heads),
                     "v_proj": _proj(a.v_proj, kv_heads), "o_proj": _proj(a.o_proj, heads, out=True)},
            "mlp": {"gate_proj": _linear(f.gate_proj), "up_proj": _linear(f.up_proj),
                    "down_proj": _linear(f.down_proj)},
        })
    return {"embed_tokens": {"embedding": _np(m.embed_tokens.weight)}, "layers": _stack(layers),
            "final_norm": _ln(m.norm), "lm_head": _linear(hf.lm_head)}


SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
             tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_matches_hf_logits_including_packed_rows(family):
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, head_dim=8)).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    _randomize(hf, seed=2)
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=97, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, rms_eps=1e-6,
        rope_base=500.0, qkv_bias=family == "qwen2", tie_embeddings=False))
    params = _decoder_params(hf, heads=4, kv_heads=2)
    dec = Decoder(cfg, scan_layers=True)

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _np(hf(input_ids=ids).logits)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    got = dec.apply({"params": params}, jnp.asarray(_np(ids)), positions, jnp.ones((2, 10), jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    # Both rows packed into one row (positions restart, segment ids separate them) give the same logits.
    packed = jnp.asarray(_np(ids).reshape(1, 20))
    got = dec.apply({"params": params}, packed, jnp.tile(jnp.arange(10), 2)[None],
                    jnp.repeat(jnp.asarray([1, 2]), 10)[None])
    np.testing.assert_allclose(np.asarray(got).reshape(2, 10, 97), want, atol=1e-5, rtol=0)
