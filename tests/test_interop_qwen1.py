"""Qwen1 layout (Belle-VL's Qwen-14B, docs/architectures.md 4.3): a tiny Qwen2ForCausalLM with kv heads = heads,
rewritten in Qwen1 names (fused block-layout c_attn, w1 = up, w2 = gate), imports to the same logits
(<= 1e-5), its tensors round-trip bit-exactly through the table, and it exports as a Qwen2ForCausalLM
that loads with every tensor equal to the original."""

import json

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from configs.base import get_config
from tests.helpers import qwen1_state_dict, randomize_torch
from vlm_jax import parallel
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import Source, import_checkpoint, import_params, model_config
from vlm_jax.interop.keymap import build_leaf, expand, leaf_sources, torch_tensors
from vlm_jax.params import unflat
from vlm_jax.text.decoder import Decoder

MESH = parallel.make_mesh(get_config().mesh)
QWEN1_CONFIG = dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=97, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, kv_channels=8, intermediate_size=2 * 48,
                    layer_norm_epsilon=1e-6, rotary_emb_base=10000.0, rotary_pct=1.0, seq_length=2048,
                    no_bias=True, tie_word_embeddings=False)


def test_qwen1_layout_matches_qwen2_round_trips_and_exports(tmp_path):
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0)).eval()
    randomize_torch(hf, seed=7)
    state = qwen1_state_dict(hf)
    src = tmp_path / "qwen1"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(QWEN1_CONFIG))
    source = Source(str(src))
    assert source.family == "qwen1"
    model = model_config([source], get_config().model, "float32")
    assert (model.text.ffn, model.text.kv_heads, model.text.qkv_bias) == (48, 4, True)
    params = import_params([source], model, MESH)

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits.numpy()
    decoder = unflat({k.split("/", 1)[1]: v for k, v in params.items()})
    got = Decoder(model.text).apply({"params": decoder}, jnp.asarray(ids.numpy()),
                                    jnp.broadcast_to(jnp.arange(10), (2, 10)), None)
    assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-5

    tensors, fillers = expand(source.spec.keymap(model), {k: v.shape for k, v in params.items()})
    host = {p: build_leaf(s, lambda n: state[n].numpy(), np.float32) for p, s in leaf_sources(tensors).items()}
    back = dict(torch_tensors(tensors, fillers, lambda p, i: host[p] if i is None else host[p][i], np.float32))
    assert set(back) == set(state) - {"transformer.visual.conv1.weight"}
    for name, t in back.items():
        assert np.array_equal(t, state[name].numpy()), name

    import_checkpoint(str(src), str(tmp_path / "ckpt"), get_config().model, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "qwen2"), "hf")
    exported = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "qwen2"), dtype=torch.float32)
    want_sd, got_sd = hf.state_dict(), exported.state_dict()
    assert set(want_sd) == set(got_sd)
    assert [k for k in want_sd if not torch.equal(want_sd[k], got_sd[k])] == []
