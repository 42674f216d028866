"""LoRA checkpoints out to PyTorch: a PEFT adapter applied with `peft` to the transformers model, and the
merged HF export, both give the vlm_jax LoRA model's logits, a trained connector included (modules_to_save);
adapters (PEFT, XVERSE-V file) round-trip."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from configs.base import get_config
from tests.helpers import randomize_torch, save_torch_model
from vlm_jax import parallel
from vlm_jax.checkpoints.directory import load_params, read_meta, write_checkpoint_dir
from vlm_jax.checkpoints.params_only import restore_params
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import import_checkpoint
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.interop import xverse_v
from vlm_jax.interop.peft import import_adapter
from vlm_jax.model import VLM
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

peft = pytest.importorskip("peft")

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
TEXT = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=1000.0, tie_word_embeddings=False)


def _import_with_lora(torch_model, seed: int, root):
    """(HF dir, its import's meta, the import's model config with rank-4 adapters) of `torch_model` randomised with
    `seed`, saved to root/hf and imported to root/base."""
    randomize_torch(torch_model, seed)
    hf = save_torch_model(torch_model, root / "hf")
    import_checkpoint(hf, str(root / "base"), BASE, MESH)
    meta = read_meta(str(root / "base"))
    model = BASE.copy_and_resolve_references()
    model.update(meta["model"])
    model.lora.update(rank=4, alpha=8.0)
    return hf, meta, model


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """(HF LLaMA dir, its vlm_jax import, that checkpoint with random rank-4 adapters on every decoder linear,
    the LoRA model config, the LoRA checkpoint's params)."""
    root = tmp_path_factory.mktemp("peft")
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
    hf, meta, model = _import_with_lora(torch_model, 0, root)
    parts = ("decoder",)
    base = flat(restore_params(str(root / "base" / "params"), unflat(abstract_params(model, parts)),
                               unflat(param_shardings(model, parts, MESH))))
    rng = np.random.default_rng(0)
    params = {k: base.get(k, jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype))
              for k, v in abstract_params(model, parts).items()}
    assert len(params) > len(base)
    write_checkpoint_dir(str(root / "lora"), params, dict(meta, model=model.to_dict()))
    return hf, str(root / "base"), str(root / "lora"), model, params


def _jax_logits(model, params, ids: np.ndarray) -> np.ndarray:
    positions = np.arange(ids.shape[1])[None]
    return np.asarray(VLM(model).apply({"params": unflat(params)}, ids, positions, None,
                                       method=lambda m, t, p, s: m.decoder(t, p, s)))


def test_peft_adapter_and_merged_export_match_vlm_jax_lora_logits(lora_ckpt, tmp_path):
    hf, base, src, model, params = lora_ckpt
    ids = (np.arange(1, 13)[None] * 7) % 97
    want = _jax_logits(model, params, ids)
    no_lora = model.copy_and_resolve_references()
    no_lora.lora.rank = 0
    base_logits = _jax_logits(no_lora, {k: v for k, v in params.items() if "lora" not in k}, ids)
    assert np.max(np.abs(want - base_logits)) > 1e-2  # the adapters change the outputs

    export_checkpoint(src, str(tmp_path / "adapter"), "peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    names = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in names and len(names) == 2 * 7 * 2
    base_model = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # Import the adapter back onto the base checkpoint: the same adapters, bit for bit.
    back = tmp_path / "back"
    import_adapter(str(tmp_path / "adapter"), base, str(back), MESH)
    assert read_meta(str(back))["model"]["lora"]["rank"] == 4
    loaded, _ = load_params(str(back), MESH)
    assert set(loaded) == set(params)
    for k in params:
        np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(params[k]), err_msg=k)

    export_checkpoint(src, str(tmp_path / "merged"), "hf")
    merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_peft_export_refuses_a_checkpoint_without_adapters(lora_ckpt, tmp_path):
    _, base, _, _, _ = lora_ckpt
    with pytest.raises(ConversionError, match="no adapter"):
        export_checkpoint(base, str(tmp_path / "adapter"), "peft")
    assert not (tmp_path / "adapter").exists()


def test_xverse_v_adapter_file_round_trip(tmp_path):
    """connector (ln_vision + llama_proj) + LoRA -> adapter_and_lora.bin -> onto the base model: bit-exact.
    The file is what vxverse's loader takes, `torch.load(f)["model"]` with peft 0.2.0 names (no `.default`);
    the other spellings (a bare state dict, PEFT's `.default`, no `llama_model.`, no ln_vision, the buffers a
    MiniGPT-4-style save keeps) read too."""
    model = BASE.copy_and_resolve_references()
    model.vision.update(image_size=28, patch_size=14, width=32, depth=2, heads=4, mlp_dim=64)
    model.text.update(vocab_size=97, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=12, ffn=48)
    model.connector.in_norm = True
    model.lora.update(rank=4, alpha=8.0, dropout=0.05)
    parts = ("connector", "decoder", "vision")
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in abstract_params(model, parts).items()}
    write_checkpoint_dir(str(tmp_path / "full"), params, dict(family="native", parts=list(parts),
                                                             model=model.to_dict()))
    base_model = model.copy_and_resolve_references()
    base_model.lora.rank, base_model.connector.in_norm = 0, False
    base = {k: v for k, v in params.items() if not k.startswith("connector/") and "lora_" not in k}
    write_checkpoint_dir(str(tmp_path / "base"), base, dict(family="native", parts=["decoder", "vision"],
                                                            model=base_model.to_dict()))

    export_checkpoint(str(tmp_path / "full"), str(tmp_path / "xv"), "xverse_v")
    saved = torch.load(str(tmp_path / "xv" / xverse_v.FILE), weights_only=True)
    assert list(saved) == ["model"]
    state = saved["model"]
    assert state["llama_proj.0.weight"].shape == (32, 32) and "ln_vision.bias" in state
    assert state["llama_model.base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(state) == 6 + 2 * 7 * 2

    xverse_v.import_adapter(str(tmp_path / "xv" / xverse_v.FILE), str(tmp_path / "base"), str(tmp_path / "back"),
                            MESH)
    back, meta = load_params(str(tmp_path / "back"), MESH)
    assert meta["model"]["lora"]["alpha"] == 8.0 and meta["model"]["connector"]["in_norm"]
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(np.asarray(back[k]), params[k], err_msg=k)

    other = {k.removeprefix("llama_model.").replace(".weight", ".default.weight") if "lora_" in k else k: v
             for k, v in state.items() if not k.startswith("ln_vision")}
    other["llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    other["visual_encoder.visual.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(other, str(tmp_path / "other.bin"))
    xverse_v.import_adapter(str(tmp_path / "other.bin"), str(tmp_path / "base"), str(tmp_path / "back2"), MESH)
    back2, _ = load_params(str(tmp_path / "back2"), MESH)
    np.testing.assert_array_equal(np.asarray(back2["connector/in_norm/scale"]), 1.0)
    for k in params:
        if "in_norm" not in k:
            np.testing.assert_array_equal(np.asarray(back2[k]), params[k], err_msg=k)


def test_peft_adapter_carries_the_trained_connector_as_modules_to_save(tmp_path):
    """XVERSE-V stage 2's shape on a tiny LLaVA: LoRA on every LLM linear plus a trained connector. The PEFT
    adapter lists the projector's linears in modules_to_save and holds their tensors, so PeftModel on the
    original model gives the merged export's logits; importing it back restores adapters and connector."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, patch_size=14, image_size=28)
    torch_model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_index=96,
        vision_feature_layer=-2, image_seq_length=4)).eval()
    hf, meta, model = _import_with_lora(torch_model, 3, tmp_path)
    parts = ("connector", "decoder", "vision")
    base, _ = load_params(str(tmp_path / "base"), MESH)
    rng = np.random.default_rng(2)
    params = {k: np.asarray(base[k]) if k in base else (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in abstract_params(model, parts).items()}
    connector = [k for k in params if k.startswith("connector/")]
    for k in connector:  # the stage's trained projector
        params[k] = params[k] + (0.3 * rng.standard_normal(params[k].shape)).astype(np.float32)
    lora = [k for k in params if "lora_" in k]
    write_checkpoint_dir(str(tmp_path / "run"), params,
                         dict(meta, model=model.to_dict(), trained=sorted(lora + connector)),
                         extra_from=str(tmp_path / "base"))

    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "adapter"), "peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    names = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    saved = {n for n in names if "lora_" not in n}
    assert saved == {f"base_model.model.model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2)
                     for w in ("weight", "bias")}
    assert len(names - saved) == 2 * 7 * 2

    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "merged"), "hf")
    ids = torch.cat([torch.tensor([[1, 7]]), torch.full((1, 4), 96), torch.arange(10, 20)[None]], 1)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged"),
                                                                        dtype=torch.float32).eval()

    def peft_logits(adapter: str) -> np.ndarray:
        original = transformers.LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
        adapted = peft.PeftModel.from_pretrained(original, adapter).eval()
        with torch.no_grad():
            return adapted(input_ids=ids, pixel_values=pixels).logits.numpy()

    with torch.no_grad():
        want = merged(input_ids=ids, pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(peft_logits(str(tmp_path / "adapter")), want, atol=1e-5, rtol=0)
    # The same run recorded as training LoRA alone: no modules_to_save, and the adapter misses the projector.
    write_checkpoint_dir(str(tmp_path / "lora_only"), params, dict(meta, model=model.to_dict(), trained=lora))
    export_checkpoint(str(tmp_path / "lora_only"), str(tmp_path / "adapter_lora"), "peft")
    assert json.loads((tmp_path / "adapter_lora" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert np.max(np.abs(peft_logits(str(tmp_path / "adapter_lora")) - want)) > 1e-2

    import_adapter(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "back"), MESH)
    back, back_meta = load_params(str(tmp_path / "back"), MESH)
    assert set(back) == set(params) and set(connector) <= set(back_meta["trained"])
    for k in params:
        np.testing.assert_array_equal(np.asarray(back[k]), params[k], err_msg=k)

    # PEFT matches modules_to_save by name suffix: `multi_modal_projector` saves the same tensors.
    config["modules_to_save"] = ["multi_modal_projector"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    import_adapter(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "back2"), MESH)
    back2, _ = load_params(str(tmp_path / "back2"), MESH)
    for k in connector:
        np.testing.assert_array_equal(np.asarray(back2[k]), params[k], err_msg=k)
