"""BLIP-2 (Ziya-BLIP2 shape: EVA ViT + Q-Former + LLaMA) against transformers' Blip2ForConditionalGeneration:
fp32 parity of vision features, Q-Former + projection output and logits (<= 1e-5), bit-identical
HF -> vlm_jax -> HF and vlm_jax -> HF -> vlm_jax round trips, Q-Formers whose depth is no multiple of their
cross-attention frequency, and Ziya's split layout (visual part + LLaMA)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs.base import get_config
from tests.helpers import assert_reimport_bit_exact, randomize_torch, save_torch_model
from vlm_jax import parallel
from vlm_jax.checkpoints.params_only import restore_params, save_params
from vlm_jax.interop.blip2 import visual_model_config
from vlm_jax.interop.check import check
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import META_FILE, import_checkpoint, read_meta
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
IMAGE_TOKEN = 96
QKV_BIAS = "vision_model.encoder.layers.{}.self_attn.qkv.bias"


def _blip2(layers: int = 6, frequency: int = 2) -> transformers.Blip2ForConditionalGeneration:
    """Tiny, with every shape distinct: by default 6 Q-Former layers in pairs (3 cross-attention layers),
    Q-Former width 24 != vision width 32 != LLM width 40, GQA LLaMA."""
    text = transformers.LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5)
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=28, patch_size=14)
    qformer = transformers.Blip2QFormerConfig(hidden_size=24, num_hidden_layers=layers, num_attention_heads=2,
                                              intermediate_size=40, cross_attention_frequency=frequency)
    return transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=5,
        image_token_index=IMAGE_TOKEN))


def _save_blip2(path, layers: int = 6, frequency: int = 2) -> str:
    model = _blip2(layers, frequency).eval()
    # Random everywhere, the key slice of every fused qkv bias included: our ViT has no key bias, and a
    # key bias never changes attention, so parity must hold even when a checkpoint's slice is not zero.
    randomize_torch(model, 0)
    return save_torch_model(model, path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return _save_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("imported") / "ckpt")
    import_checkpoint(hf_dir, out, BASE, MESH)
    return out


def test_matches_transformers_blip2(hf_dir):
    report = check(hf_dir, BASE, MESH)
    assert report["family"] == "blip2"
    assert {"vision_features", "projector", "logits"} <= set(report), report
    assert report["max_abs_diff"] <= 1e-5, report


def _load(path: str) -> transformers.Blip2ForConditionalGeneration:
    model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _assert_same(original: torch.nn.Module, exported: torch.nn.Module) -> None:
    """Every tensor bit-identical, in the same dtype: the key slice of the ViT's fused qkv bias, which the model
    does not hold, too (import carried the tensor)."""
    want, got = original.state_dict(), exported.state_dict()
    assert set(want) == set(got)
    assert [k for k in want if not torch.equal(want[k], got[k]) or want[k].dtype != got[k].dtype] == []
    assert all(want[QKV_BIAS.format(i)].view(3, -1)[1].any() for i in range(3))  # a key slice that is not zero


def test_hf_round_trip_is_bit_identical(hf_dir, imported, tmp_path):
    meta = read_meta(imported)
    assert meta["family"] == "blip2" and meta["model"]["connector"]["num_queries"] == 5
    export_checkpoint(imported, str(tmp_path / "out"), "hf")
    original, exported = _load(hf_dir), _load(str(tmp_path / "out"))
    assert exported.config.image_token_id == IMAGE_TOKEN
    _assert_same(original, exported)
    ids = torch.cat([torch.tensor([[1, 7]]), torch.full((1, 5), IMAGE_TOKEN), torch.arange(10, 20)[None]], 1)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = original(input_ids=ids, pixel_values=pixels).logits
        b = exported(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def test_jax_torch_jax_round_trip_is_bit_exact(imported, tmp_path):
    """Random vlm_jax params (not from torch) -> HF BLIP-2 directory -> import: every leaf bit-exact."""
    model, parts = BASE.copy_and_resolve_references(), ("connector", "decoder", "vision")
    model.update(read_meta(imported)["model"])
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in abstract_params(model, parts).items()}
    src = tmp_path / "native"
    save_params(str(src / "params"), unflat(params))
    (src / META_FILE).write_text(json.dumps(dict(family="native", parts=list(parts), model=model.to_dict())))
    export_checkpoint(str(src), str(tmp_path / "hf"), "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # A native model has no image token: export adds one row after the vocabulary.
    assert config["image_token_index"] == 97 and config["text_config"]["vocab_size"] == 98
    assert config["qformer_config"]["cross_attention_frequency"] == 2
    qkv_bias = _load(str(tmp_path / "hf")).state_dict()[QKV_BIAS.format(0)].view(3, -1)
    assert not qkv_bias[1].any()  # nothing carried: the key slice the model does not hold is written as zeros
    export_checkpoint(str(src), str(tmp_path / "hf96"), "hf", image_token_index=IMAGE_TOKEN)
    assert_reimport_bit_exact(str(tmp_path / "hf96"), str(tmp_path / "back"), BASE, MESH, model, parts, params)


def _layers_holding(shapes: dict, leaf: str) -> int:
    """How many Q-Former layers hold `leaf`: a scanned one once per unit, a `tail` one once."""
    return sum(s.shape[0] if k.startswith("connector/layers/") else 1 for k, s in shapes.items() if k.endswith(leaf))


@pytest.mark.parametrize("layers, frequency", [(3, 2), (2, 1), (1, 2), (4, 3), (2, 3)])
def test_qformer_of_any_depth(layers, frequency, tmp_path):
    """HF gives Q-Former layer i cross-attention iff i % cross_attention_frequency == 0, at any depth; the
    whole units of `frequency` layers scan, the rest (led by a cross-attention layer) form `tail`. Parity, and
    HF -> vlm_jax -> HF bit-identical (which writes every tensor from the imported leaves)."""
    hf_dir = _save_blip2(tmp_path / "blip2", layers, frequency)
    report = check(hf_dir, BASE, MESH)
    assert "projector" in report and report["max_abs_diff"] <= 1e-5, report
    imported = str(tmp_path / "imported")
    import_checkpoint(hf_dir, imported, BASE, MESH)
    model = BASE.copy_and_resolve_references()
    model.update(read_meta(imported)["model"])
    shapes = abstract_params(model, ("connector",))
    assert _layers_holding(shapes, "/mlp_norm/scale") == layers
    assert _layers_holding(shapes, "/cross_norm/scale") == len(range(0, layers, frequency))
    assert any(k.startswith("connector/tail/") for k in shapes) == bool(layers % frequency)
    assert any(k.startswith("connector/layers/") for k in shapes) == (layers >= frequency)
    export_checkpoint(imported, str(tmp_path / "out"), "hf")
    _assert_same(_load(hf_dir), _load(str(tmp_path / "out")))


def test_cross_attention_frequency_below_one_is_refused():
    hf = json.loads(_blip2().config.to_json_string())
    hf["qformer_config"]["cross_attention_frequency"] = 0
    with pytest.raises(ConversionError, match="cross_attention_frequency 0: must be at least 1"):
        visual_model_config(hf)


def test_ziya_layout_visual_part_plus_separate_llama(hf_dir, imported, tmp_path):
    """Ziya-BLIP2 ships the visual part alone (ViT, Q-Former, queries, projection) and its LLM separately:
    importing the two (--vision_family blip2_visual) gives the same parameters as the whole model."""
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    visual, llm = tmp_path / "visual", tmp_path / "llm"
    visual.mkdir(), llm.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("language_model.")},
              str(visual / "model.safetensors"), metadata={"format": "pt"})
    (visual / "config.json").write_text(json.dumps(config))
    prefix = "language_model."
    save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
              str(llm / "model.safetensors"), metadata={"format": "pt"})
    (llm / "config.json").write_text(json.dumps(config["text_config"]))
    model = import_checkpoint(str(llm), str(tmp_path / "ckpt"), BASE, MESH, vision=str(visual),
                              vision_family="blip2_visual")
    whole = read_meta(imported)["model"]
    assert model.to_dict() == whole | {"param_dtype": model.param_dtype}
    parts = ("connector", "decoder", "vision")
    abstract, shardings = unflat(abstract_params(model, parts)), unflat(param_shardings(model, parts, MESH))
    got = flat(restore_params(str(tmp_path / "ckpt" / "params"), abstract, shardings))
    want = flat(restore_params(os.path.join(imported, "params"), abstract, shardings))
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k
