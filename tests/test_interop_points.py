"""POINTS "CustomLlama" layout: a tiny Qwen2 rewritten by the relation of docs/architectures.md 2.5
imports to the same logits, and the fused tensors round-trip bit-exactly through the table. The rewrite follows
the released CustomLlama forward (docs/provenance.md): `key_value_dense` viewed `(kv_heads, 2 * head_dim)`, k
first; `dense_h_to_4h` chunked in two, `x1 * silu(x2)`. Its config.json fields are read with CustomLlamaConfig's
defaults, which build a LayerNorm model with o / MLP biases: POINTS' config has to say otherwise."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from configs import points15_7b
from configs.base import get_config
from tests.helpers import randomize_torch
from vlm_jax import parallel
from vlm_jax.interop import points
from vlm_jax.interop.hf_import import Source, import_params, model_config
from vlm_jax.interop.keymap import ConversionError, build_leaf, expand, leaf_sources, torch_tensors
from vlm_jax.params import unflat
from vlm_jax.text.decoder import Decoder

KV_HEADS, HEAD_DIM = 2, 8


def llm_config(**sizes) -> dict:
    """A POINTS `llm_config` as the release needs it for Qwen2.5 weights: RMSNorm, q/k/v biases only."""
    return dict(norm_type="rms_norm", qkv_proj_bias=True, out_proj_bias=False, mlp_fc1_bias=False,
                mlp_fc2_bias=False, hidden_act="swiglu", rotary_pct=1.0) | sizes


def _points_state_dict(hf: transformers.Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    sd, out = hf.state_dict(), {}
    for i in range(hf.config.num_hidden_layers):
        q, a, m = f"model.layers.{i}.", f"llm.lm.layers.{i}.attention.", f"llm.lm.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            k, v = sd[q + f"self_attn.k_proj.{kind}"], sd[q + f"self_attn.v_proj.{kind}"]
            kv = torch.stack([k.reshape(KV_HEADS, HEAD_DIM, -1), v.reshape(KV_HEADS, HEAD_DIM, -1)], 1)
            out[a + f"key_value_dense.{kind}"] = kv.reshape(2 * KV_HEADS * HEAD_DIM, *k.shape[1:])
            out[a + f"query_dense.{kind}"] = sd[q + f"self_attn.q_proj.{kind}"]
        out[a + "dense.weight"] = sd[q + "self_attn.o_proj.weight"]
        out[m + "dense_h_to_4h.weight"] = torch.cat([sd[q + "mlp.up_proj.weight"], sd[q + "mlp.gate_proj.weight"]])
        out[m + "dense_4h_to_h.weight"] = sd[q + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"llm.lm.layers.{i}.{norm}.weight"] = sd[q + f"{norm}.weight"]
    out["llm.lm.embed_in.weight"] = sd["model.embed_tokens.weight"]
    out["llm.lm.final_layer_norm.weight"] = sd["model.norm.weight"]
    out["llm.embed_out.weight"] = sd["lm_head.weight"]
    out["vision_encoder.patch_embed.proj.weight"] = torch.zeros(4, 4)  # not ours: ignored by the table
    return {k: v.contiguous() for k, v in out.items()}


def test_points_layout_matches_qwen2_and_round_trips(tmp_path):
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-5, rope_theta=1e6)).eval()
    randomize_torch(hf, seed=5)
    state = _points_state_dict(hf)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"llm_config": llm_config(
        vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=KV_HEADS,
        ffn_hidden_size=48, layernorm_epsilon=1e-5, rotary_emb_base=1e6)}))
    source = Source(str(tmp_path), "points_llm")
    model = model_config([source], get_config().model, "float32")
    flat = import_params([source], model, parallel.make_mesh(get_config().mesh))

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits.numpy()
    got = Decoder(model.text).apply({"params": unflat(flat)["decoder"]}, jnp.asarray(ids.numpy()),
                                    jnp.broadcast_to(jnp.arange(10), (2, 10)), None)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    # Export through the same table gives back every POINTS tensor bit for bit, and re-import is exact.
    keymap = points.KEYMAP.prefixed("", "decoder")
    tensors, fillers = expand(keymap, {k: v.shape for k, v in flat.items()})
    exported = dict(torch_tensors(tensors, fillers, lambda p, i: np.asarray(flat[p] if i is None else flat[p][i]),
                                  np.float32))
    assert set(exported) == set(state) - {"vision_encoder.patch_embed.proj.weight"}
    for name, array in exported.items():
        assert np.array_equal(array, state[name].numpy()), name
    for path, pieces in leaf_sources(tensors).items():
        assert np.array_equal(build_leaf(pieces, exported.__getitem__, np.float32), np.asarray(flat[path])), path


SIZES = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=8, ffn_hidden_size=48)


def test_points_llm_config_takes_the_released_defaults():
    """A field left out of `llm_config` is CustomLlamaConfig's default (RoPE base 1e4, 4 KV heads, eps 1e-5), and
    the defaults that build another model (LayerNorm, o / MLP biases, fused qkv without GQA) are refused."""
    text = points.text_config({"llm_config": llm_config(**SIZES)})
    assert (text["rope_base"], text["kv_heads"], text["rms_eps"]) == (10000.0, 4, 1e-5)
    assert points.text_config({"llm_config": llm_config(rms_norm=True, norm_type="layer_norm", **SIZES)})
    with pytest.raises(ConversionError, match="'norm_type': 'layer_norm', 'out_proj_bias': True"):
        points.text_config({"llm_config": dict(num_kv_heads=2, **SIZES)})
    with pytest.raises(ConversionError, match="'num_kv_heads': 8"):
        points.text_config({"llm_config": llm_config(num_kv_heads=8, **SIZES)})
    with pytest.raises(ConversionError, match="'rotary_pct': 0.5"):
        points.text_config({"llm_config": llm_config(rotary_pct=0.5, **SIZES)})


def test_points_export_config_builds_the_same_decoder_from_class_defaults():
    """An export with no source config.json still spells out every field whose CustomLlamaConfig default would
    build another decoder, so the released class rebuilds this one."""
    model = points15_7b.get_config().model
    written = points.hf_config(model, None)["llm_config"]
    assert {k: written[k] for k in ("norm_type", "out_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias", "qkv_proj_bias",
                                    "rotary_pct", "rotary_compress", "hidden_act", "tie_word_embeddings")} == dict(
        norm_type="rms_norm", out_proj_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False, qkv_proj_bias=True,
        rotary_pct=1.0, rotary_compress=1.0, hidden_act="swiglu", tie_word_embeddings=False)
    back = points.text_config({"llm_config": written})
    assert {k: model.text[k] for k in back} == back
