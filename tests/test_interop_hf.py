"""Import/export against tiny random PyTorch models of every family: parity of logits (fp32, <= 1e-5),
bit-identical HF -> vlm_jax -> HF and vlm_jax -> HF -> vlm_jax round trips, and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from configs.base import get_config
from tests.helpers import assert_reimport_bit_exact, assert_same_safetensors, randomize_torch, save_torch_model
from vlm_jax import parallel
from vlm_jax.cli import convert
from vlm_jax.data.image_processor import ImageProcessor, resolve
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.interop import check as check_module
from vlm_jax.checkpoints.params_only import restore_params, save_params
from vlm_jax.checkpoints.streaming import stored_arrays
from vlm_jax.interop.check import check
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import META_FILE, import_checkpoint, read_meta
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
# Odd vocab, GQA (4 query heads over 2 kv heads), heads * head_dim (48) != hidden (32).
TEXT = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=1000.0, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
              hidden_act="quick_gelu")


def _llava(text_cls: str, image_size: int) -> transformers.LlavaForConditionalGeneration:
    text = getattr(transformers, text_cls)(**TEXT)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION, image_size=image_size), text_config=text,
        image_token_index=96, vision_feature_layer=-2, image_seq_length=(image_size // 14) ** 2))


def _to_new_layout(path: str) -> None:
    """Rewrites a saved LLaVA's tensors in the transformers >= 4.52 in-memory names."""
    file = os.path.join(path, "model.safetensors")
    renamed = {}
    for k, v in load_file(file).items():
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    save_file(renamed, file, metadata={"format": "pt"})


BUILDERS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)),
    "clip336": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, image_size=42)),
    "llava_legacy": lambda: _llava("LlamaConfig", 28),
    "llava_new_qwen2": lambda: _llava("Qwen2Config", 42),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for seed, (name, build) in enumerate(BUILDERS.items()):
        model = build().eval()
        randomize_torch(model, seed)
        out[name] = save_torch_model(model, tmp_path_factory.mktemp(name))
        if name == "llava_new_qwen2":
            _to_new_layout(out[name])
    return out


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("imported")
    for name, path in hf_dirs.items():
        import_checkpoint(path, str(root / name), BASE, MESH)
    return {name: str(root / name) for name in hf_dirs}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_imported_model_matches_pytorch(hf_dirs, name):
    report = check(hf_dirs[name], BASE, MESH)
    assert report["max_abs_diff"] <= 1e-5, report
    expected = {"llama": {"logits"}, "qwen2": {"logits"}, "clip336": {"vision_features"}}.get(
        name, {"vision_features", "projector", "logits"})
    assert expected <= set(report), report


def _load(cls: str, path: str):
    model, info = getattr(transformers, cls).from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hf_round_trip_is_bit_identical(hf_dirs, imported, tmp_path, name):
    cls = read_meta(imported[name])["hf_config"].get("architectures", ["CLIPVisionModel"])[0]
    export_checkpoint(imported[name], str(tmp_path / "out"), "hf", shard_bytes=64 << 10)
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")  # several shards
    original, exported = _load(cls, hf_dirs[name]), _load(cls, str(tmp_path / "out"))
    want, got = original.state_dict(), exported.state_dict()
    assert set(want) == set(got)
    # Every tensor bit for bit: the blocks past the feature layer and CLIP's post_layernorm, which the model
    # never computes with, too (import carried them).
    assert [k for k in want if not torch.equal(want[k], got[k]) or want[k].dtype != got[k].dtype] == []
    if name != "clip336":
        ids = torch.arange(1, 13)[None] % 90
        kwargs = {}
        if name.startswith("llava"):
            size = original.config.vision_config.image_size
            n = (size // 14) ** 2
            ids = torch.cat([ids[:, :2], torch.full((1, n), 96), ids[:, 2:]], 1)
            kwargs["pixel_values"] = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(original(input_ids=ids, **kwargs).logits, exported(input_ids=ids, **kwargs).logits)


def test_jax_torch_jax_round_trip_is_bit_exact(imported, tmp_path):
    """Random vlm_jax params (not from torch) -> HF LLaVA directory -> import: every leaf bit-exact."""
    meta = read_meta(imported["llava_legacy"])
    model, parts = BASE.copy_and_resolve_references(), ("connector", "decoder", "vision")
    model.update(meta["model"])
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(np.float32)
              for k, v in abstract_params(model, parts).items()}
    src = tmp_path / "native"
    save_params(str(src / "params"), unflat(params))
    (src / META_FILE).write_text(json.dumps(dict(family="native", parts=list(parts), model=model.to_dict())))
    export_checkpoint(str(src), str(tmp_path / "hf"), "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["image_token_index"] == 97 and config["text_config"]["vocab_size"] == 98  # row added
    export_checkpoint(str(src), str(tmp_path / "hf96"), "hf", image_token_index=96)
    assert_reimport_bit_exact(str(tmp_path / "hf96"), str(tmp_path / "back"), BASE, MESH, model, parts, params)


def test_original_llava_layout_round_trip(imported, tmp_path):
    """HF LLaVA -> original LLaVA state dict + separate CLIP tower -> import: same params, bit for bit. The
    tower's copy a LLaVA training save leaves under `model.vision_tower.vision_tower.` is skipped (LLaVA loads the
    tower from `mm_vision_tower`; here zeroed, so only the separate tower can give the bit-exact match)."""
    src = imported["llava_legacy"]
    export_checkpoint(src, str(tmp_path / "orig"), "original")
    tensors = load_file(str(tmp_path / "orig" / "model.safetensors"))
    names = set(tensors)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight"} <= names
    assert not any(n.startswith(("vision", "language_model", "multi_modal")) for n in names)
    tower = load_file(str(tmp_path / "orig" / "vision_tower" / "model.safetensors"))
    tensors |= {"model.vision_tower.vision_tower." + k: torch.zeros_like(v) for k, v in tower.items()}
    save_file(tensors, str(tmp_path / "orig" / "model.safetensors"))
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    import_checkpoint(str(tmp_path / "orig"), str(tmp_path / "back"), BASE, MESH,
                      vision=str(tmp_path / "orig" / "vision_tower"))
    model = BASE.copy_and_resolve_references()
    model.update(read_meta(src)["model"])
    parts = ("connector", "decoder", "vision")
    assert read_meta(str(tmp_path / "back"))["model"] == model.to_dict()
    target = unflat(abstract_params(model, parts)), unflat(param_shardings(model, parts, MESH))
    a = flat(restore_params(os.path.join(src, "params"), *target))
    b = flat(restore_params(str(tmp_path / "back" / "params"), *target))
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_import_with_a_separate_tower_records_the_tower_processor(hf_dirs, tmp_path):
    """CLIP + Vicuna: the LLM has the tokenizer, the tower the image processor; the import keeps both, so a run
    from it preprocesses as the tower's processor says (data.image_processor="auto")."""
    tower = tmp_path / "clip"
    shutil.copytree(hf_dirs["clip336"], tower)
    CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}).save_pretrained(
        str(tower))
    import_checkpoint(hf_dirs["llama"], str(tmp_path / "ckpt"), BASE, MESH, vision=str(tower))
    config = get_config()
    config.init_params = str(tmp_path / "ckpt")
    processor, file = resolve(config)
    assert file == str(tmp_path / "ckpt" / "tokenizer" / "preprocessor_config.json")
    assert (processor.resize, processor.size, processor.crop) == ("shortest_edge", (42,), (42, 42))


def test_bad_checkpoint_lists_every_offending_tensor_and_leaves_nothing(hf_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(hf_dirs["llama"], "config.json")).read())
    tensors = load_file(os.path.join(hf_dirs["llama"], "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 31)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        import_checkpoint(str(bad), str(tmp_path / "dst"), BASE, MESH)
    msg = str(e.value)
    assert "missing (1)" in msg and "model.layers.1.mlp.up_proj.weight [48, 32]" in msg
    assert "unexpected (1)" in msg and "model.extra.weight [3]" in msg
    assert "wrong shape (1)" in msg and "model.layers.0.self_attn.k_proj.weight: [24, 31], expected [24, 32]" in msg
    assert os.listdir(tmp_path) == ["bad"]


def test_import_casts_and_restores_into_a_whole_vlm(hf_dirs, tmp_path):
    """An imported LLM (decoder only, bf16) restores into a VLM's param tree as its decoder, cast to the
    model's dtype: what `--config.init_params` does before building a fresh optimizer."""
    import_checkpoint(hf_dirs["llama"], str(tmp_path / "bf16"), BASE, MESH, param_dtype="bfloat16")
    meta = read_meta(str(tmp_path / "bf16"))
    assert meta["model"]["param_dtype"] == "bfloat16" and meta["parts"] == ["decoder"]
    model = BASE.copy_and_resolve_references()
    model.update(meta["model"])
    model.param_dtype = "float32"
    parts = ("connector", "decoder", "vision")
    got = restore_params(str(tmp_path / "bf16" / "params"), unflat(abstract_params(model, parts)),
                         unflat(param_shardings(model, parts, MESH)))
    assert set(got) == {"decoder"}
    want = load_file(os.path.join(hf_dirs["llama"], "model.safetensors"))["model.embed_tokens.weight"]
    embedding = np.asarray(got["decoder"]["embed_tokens"]["embedding"])
    assert embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding, want.to(torch.bfloat16).float().numpy())
    model.text.hidden = 64
    with pytest.raises(ValueError, match="decoder/embed_tokens/embedding"):
        restore_params(str(tmp_path / "bf16" / "params"), unflat(abstract_params(model, parts)),
                       unflat(param_shardings(model, parts, MESH)))


def test_import_streams_onto_a_sharded_mesh(hf_dirs, imported, tmp_path):
    """On a data x fsdp x tensor = 2 x 2 x 2 mesh the import writes each shard of each leaf, a layer stack one
    layer per stored chunk (never a whole stack in memory); it restores to the replicated import's values and
    exports the same tensors."""
    config = get_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(config.mesh)
    dst = str(tmp_path / "sharded")
    import_checkpoint(hf_dirs["llava_legacy"], dst, BASE, mesh)
    model = BASE.copy_and_resolve_references()
    model.update(read_meta(dst)["model"])
    parts = ("connector", "decoder", "vision")
    stored = stored_arrays(os.path.join(dst, "params"))
    stacks = [k for k in stored if "/layers/" in k]
    assert stacks and all(stored[k].chunk_rows == 1 for k in stacks)
    assert any(any(s.spec) for s in param_shardings(model, parts, mesh).values())  # some leaves really are split
    got = flat(restore_params(os.path.join(dst, "params"), unflat(abstract_params(model, parts)),
                              unflat(param_shardings(model, parts, mesh))))
    want = flat(restore_params(os.path.join(imported["llava_legacy"], "params"),
                               unflat(abstract_params(model, parts)), unflat(param_shardings(model, parts, MESH))))
    assert set(got) == set(want) and all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
    export_checkpoint(dst, str(tmp_path / "out"), "hf")
    export_checkpoint(imported["llava_legacy"], str(tmp_path / "out_replicated"), "hf")
    assert_same_safetensors(str(tmp_path / "out_replicated" / "model.safetensors"),
                            str(tmp_path / "out" / "model.safetensors"))


def _llava_with_processor(path, image_processor) -> str:
    """A tiny LLaVA saved with the demo tokenizer (its <image> is id 4) and `image_processor` as its processor."""
    tokenizer = load_tokenizer("")
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION, image_size=42),
        text_config=transformers.LlamaConfig(**dict(TEXT, vocab_size=512)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        image_seq_length=9)).eval()
    randomize_torch(model, 7)
    save_torch_model(model, path)
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                vision_feature_select_strategy="default",
                                num_additional_image_tokens=1).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("processor", [
    lambda: CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}),
    lambda: LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}),
], ids=["clip", "llava_pad"])
def test_check_on_an_image_preprocesses_each_side_itself(tmp_path, capsys, monkeypatch, processor):
    src = _llava_with_processor(tmp_path / "llava", processor())
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated: each side must load it upright the same way
    Image.fromarray(rng.integers(0, 256, (517, 333, 3), np.uint8)).save(tmp_path / "img.jpg", exif=exif.tobytes())
    convert.main(["check", "--src", src, "--image", str(tmp_path / "img.jpg"), "--question", "What colour is it?"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pixel_max_abs_diff"] <= 1e-6, report
    assert report["max_abs_diff"] <= 2e-5, report
    assert {"vision_features", "projector", "logits"} <= set(report), report
    # A vlm_jax side that squashes instead shows in pixel_max_abs_diff.
    monkeypatch.setattr(check_module, "read_processor", lambda folder: (ImageProcessor(size=(42, 42)), folder))
    assert check(src, BASE, MESH, image=str(tmp_path / "img.jpg"))["pixel_max_abs_diff"] > 0.1


def test_check_image_needs_a_llava(hf_dirs, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ConversionError, match="check --image runs LLaVA checkpoints"):
        check(hf_dirs["llama"], BASE, MESH, image=str(tmp_path / "a.png"))
    with pytest.raises(ConversionError, match="needs the checkpoint's processor"):
        check(hf_dirs["llava_legacy"], BASE, MESH, image=str(tmp_path / "a.png"))
