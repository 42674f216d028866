"""Qwen-VL / Belle-VL layout against a PyTorch reference of the published computation (no transformers class:
tests/qwen_vl_reference.py) with the LLM run by transformers' Qwen2ForCausalLM: the ViT tokens, resampler
output and VLM logits match at <= 1e-5 (fp32) at the table's own grid and at a larger, interpolated grid;
the tensors round-trip bit-exactly through the table and through import -> export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs.base import get_config
from tests.helpers import qwen1_state_dict, randomize_torch
from tests.qwen_vl_reference import VisionTransformer, sincos_2d
from vlm_jax import parallel
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import Source, import_checkpoint, import_params, model_config
from vlm_jax.interop.keymap import build_leaf, expand, leaf_sources, torch_tensors
from vlm_jax.model import VLM
from vlm_jax.params import unflat
from vlm_jax.resampler import sincos_2d as our_sincos_2d

MESH = parallel.make_mesh(get_config().mesh)
HIDDEN, QUERIES = 256, 16  # resampler heads = output_dim / 128 = 2
VISUAL = dict(image_size=64, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2.5, output_dim=HIDDEN,
              n_queries=QUERIES, image_start_id=151857)
CONFIG = dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=97, hidden_size=HIDDEN,
              num_hidden_layers=2, num_attention_heads=4, kv_channels=64, intermediate_size=2 * 48,
              layer_norm_epsilon=1e-6, rotary_emb_base=10000.0, rotary_pct=1.0, visual=VISUAL)


@pytest.fixture(scope="module")
def belle(tmp_path_factory):
    visual = VisionTransformer(VISUAL["patch_size"], VISUAL["width"], VISUAL["layers"], VISUAL["heads"],
                               VISUAL["mlp_ratio"], HIDDEN, QUERIES).eval()
    randomize_torch(visual, seed=3)
    with torch.no_grad():  # the fixed sin-cos table is not a learned weight
        visual.attn_pool.pos_embed.copy_(torch.from_numpy(sincos_2d(HIDDEN, 4)))
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0)).eval()
    randomize_torch(llm, seed=4)
    state = qwen1_state_dict(llm) | {"transformer.visual." + k: v.contiguous()
                                     for k, v in visual.state_dict().items()}
    path = tmp_path_factory.mktemp("belle")
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    source = Source(str(path))
    model = model_config([source], get_config().model, "float32")
    params = import_params([source], model, MESH)
    return visual, llm, state, source, model, params


def _diff(got: jax.Array, want: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(got) - want.detach().numpy())))


def test_sincos_table_is_qwen_vls():
    np.testing.assert_allclose(our_sincos_2d(HIDDEN, 4), sincos_2d(HIDDEN, 4), atol=1e-6)


@pytest.mark.parametrize("size", [64, 80])  # 16 x 16 patches = the table's grid; 20 x 20 = resized
def test_matches_the_reference(belle, size):
    visual, llm, _, source, model, params = belle
    assert source.family == "qwen_vl" and model.connector.num_queries == QUERIES and model.vision.mlp_dim == 80
    vlm, p = VLM(model), unflat(params)
    pixels = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    tiles = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    ids = np.random.default_rng(1).integers(0, 97, (2, 8 + QUERIES))
    dest = np.arange(2, 2 + QUERIES)
    with torch.no_grad():
        feats, tokens = visual.features(torch.from_numpy(pixels)), visual(torch.from_numpy(pixels))
        embeds = llm.model.embed_tokens(torch.from_numpy(ids))
        embeds[:, dest] = tokens
        want = llm(inputs_embeds=embeds).logits
    run = jax.jit(lambda p, *a, method: vlm.apply({"params": p}, *a, method=method), static_argnames="method")
    assert _diff(run(p, tiles, method=lambda m, t: m.vision(t)), feats) <= 1e-5
    assert _diff(run(p, tiles, method=lambda m, t: m.connector(m.vision(t))), tokens) <= 1e-5
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    images = dict(tiles=tiles[:, None], tile_mask=jnp.ones((2, 1), bool),
                  image_dest=jnp.broadcast_to(jnp.asarray(dest), (2, QUERIES)))
    got = run(p, jnp.asarray(ids), positions, jnp.ones(ids.shape, jnp.int32), images, method=lambda m, *a: m(*a))
    assert _diff(got, want) <= 1e-5


def test_table_round_trip_is_bit_exact(belle):
    _, _, state, source, model, params = belle
    tensors, fillers = expand(source.spec.keymap(model), {k: v.shape for k, v in params.items()})
    host = {p: build_leaf(s, lambda n: state[n].numpy(), np.float32) for p, s in leaf_sources(tensors).items()}
    back = dict(torch_tensors(tensors, fillers, lambda p, i: host[p] if i is None else host[p][i], np.float32))
    assert set(back) == set(state)
    for name, t in back.items():
        assert np.array_equal(t, state[name].numpy()), name


def test_export_writes_the_qwen_vl_layout(belle, tmp_path):
    """Import -> export --format hf: the same tensors bit for bit under the same names, and the config's
    visual block (with the `image_start_id` modeling_qwen.py looks the images up by) and Qwen1 fields come back."""
    _, _, state, source, _, _ = belle
    import_checkpoint(source.path, str(tmp_path / "ckpt"), get_config().model, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(state)
    assert [k for k in state if not torch.equal(out[k], state[k])] == []
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["visual"] == VISUAL and config["model_type"] == "qwen" and config["intermediate_size"] == 96
