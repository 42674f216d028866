"""Qwen2-VL vision tower + merger and POINTS1.5 checkpoints: `convert.py check` parity on packed images,
bit-exact torch -> vlm_jax -> torch and vlm_jax -> torch -> vlm_jax round trips, both HF naming generations,
and the whole POINTS1.5 layout (vision_encoder / vision_projector / CustomLlama LLM)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2VisionTransformerPretrainedModel

from configs.base import get_config
from tests.helpers import assert_same_safetensors, randomize_torch
from tests.test_interop_points import HEAD_DIM, KV_HEADS, _points_state_dict, llm_config
from tests.test_navit import tiny_tower
from vlm_jax import parallel
from vlm_jax.checkpoints.params_only import restore_params, save_params
from vlm_jax.data.navit import pack_patches
from vlm_jax.interop import qwen2_vl
from vlm_jax.interop.check import check
from vlm_jax.interop.qwen2_vl_check import CHECK_GRIDS
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import META_FILE, Source, import_checkpoint, import_params, model_config
from vlm_jax.interop.keymap import ConversionError, expand, torch_tensors
from vlm_jax.model import VLM
from vlm_jax.params import abstract_params, flat, param_shardings, unflat

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
PARTS = ("connector", "vision")


def _restore(path: str, model) -> dict:
    return flat(restore_params(path, unflat(abstract_params(model, PARTS)), unflat(param_shardings(model, PARTS, MESH))))


def test_tower_check_and_round_trips_are_exact(tmp_path):
    path = tiny_tower(tmp_path)
    report = check(path, BASE, MESH)
    assert report["family"] == "qwen2_vl_vision" and set(report) >= {"vision_features", "projector"}
    assert report["max_abs_diff"] <= 1e-5, report

    # torch -> vlm_jax -> torch: every tensor bit for bit, and the exported directory loads cleanly.
    import_checkpoint(path, str(tmp_path / "ckpt"), BASE, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    assert_same_safetensors(f"{path}/model.safetensors", str(tmp_path / "out" / "model.safetensors"))
    _, info = Qwen2VisionTransformerPretrainedModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    # vlm_jax -> torch -> vlm_jax from random params that never came from torch.
    model = BASE.copy_and_resolve_references()
    model.update(json.loads((tmp_path / "ckpt" / META_FILE).read_text())["model"])
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in abstract_params(model, PARTS).items()}
    save_params(str(tmp_path / "native" / "params"), unflat(params))
    (tmp_path / "native" / META_FILE).write_text(json.dumps(dict(family="native", parts=PARTS, model=model.to_dict())))
    export_checkpoint(str(tmp_path / "native"), str(tmp_path / "hf"), "hf")
    import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back"), BASE, MESH)
    back = _restore(str(tmp_path / "back" / "params"), model)
    assert set(back) == set(params)
    assert [k for k in params if not np.array_equal(np.asarray(back[k]), params[k])] == []


def test_whole_qwen2_vl_checkpoint_vision_part_in_both_generations(tmp_path):
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4, mlp_ratio=2),
        text_config=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4)))
    hf = transformers.Qwen2VLForConditionalGeneration(config).eval()
    randomize_torch(hf, seed=1)
    hf.save_pretrained(str(tmp_path / "legacy"))  # visual.*, model.*, lm_head.*
    (tmp_path / "new").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "new" / "model.safetensors"))
    (tmp_path / "new" / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    assert any(k.startswith("model.visual.") for k in hf.state_dict())  # the >= 4.52 in-memory names

    imported = []
    for layout in ("legacy", "new"):
        source = Source(str(tmp_path / layout), "qwen2_vl_vision")
        model = model_config([source], BASE, "float32")
        imported.append({k: np.asarray(v) for k, v in import_params([source], model, MESH).items()})
    assert imported[0].keys() == imported[1].keys()
    assert all(np.array_equal(imported[0][k], imported[1][k]) for k in imported[0])
    w = hf.model.visual.patch_embed.proj.weight.detach().numpy()
    assert np.array_equal(imported[0]["vision/stem/patch_embed/kernel"], w.reshape(w.shape[0], -1).T)


def test_points_checkpoint_imports_whole_and_round_trips(tmp_path):
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(tiny_tower(tmp_path), dtype=torch.float32).eval()
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-5, rope_theta=1e6)).eval()
    randomize_torch(llm, seed=5)
    projector = PatchMerger(dim=32, context_dim=64).eval()  # POINTS trains its own, separate from the tower's
    randomize_torch(projector, seed=6)
    state = {k: v for k, v in _points_state_dict(llm).items() if not k.startswith("vision_encoder.")}
    state |= {f"vision_encoder.{k}": v for k, v in tower.state_dict().items()}  # its merger is stored, unused
    state |= {f"vision_projector.{k}": v for k, v in projector.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vision_config=tower.config.to_dict(), llm_config=llm_config(
            vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=KV_HEADS,
            ffn_hidden_size=48, layernorm_epsilon=1e-5, rotary_emb_base=1e6))))
    source = Source(str(tmp_path), "points")
    model = model_config([source], BASE, "float32")
    leaves = import_params([source], model, MESH)
    params = unflat(leaves)

    rng = np.random.default_rng(0)
    images = [(rng.standard_normal((int(np.prod(g)), 1176)).astype(np.float32), g) for g in CHECK_GRIDS]
    row = pack_patches(images, 64)
    packed = {k: jnp.asarray(v[None]) for k, v in row.items()}
    got = jax.jit(lambda p, b: VLM(model).apply({"params": p}, b, method=VLM.encode_images))(params, packed)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = jax.jit(lambda p, t: VLM(model).apply({"params": p}, t, jnp.broadcast_to(jnp.arange(10), (2, 10)),
                                                   None, method=lambda m, *a: m.decoder(*a)))(params, jnp.asarray(ids))
    with torch.no_grad():
        feats = tower(hidden_states=torch.from_numpy(np.concatenate([p for p, _ in images])),
                      grid_thw=torch.tensor(CHECK_GRIDS)).last_hidden_state
        want = projector(feats).numpy()
        want_logits = llm(input_ids=ids).logits.numpy()
    n = want.shape[0]
    np.testing.assert_allclose(np.asarray(got[0, :n]), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-5, rtol=0)

    # The table writes back every tensor it read, bit for bit (the tower's unused merger aside).
    tensors, fillers = expand(source.spec.keymap(model), {k: v.shape for k, v in leaves.items()})
    out = dict(torch_tensors(tensors, fillers, lambda p, i: np.asarray(leaves[p] if i is None else leaves[p][i]),
                             np.float32))
    assert set(out) == {k for k in state if not k.startswith("vision_encoder.merger.")}
    assert [k for k in out if not np.array_equal(out[k], state[k].numpy())] == []


def test_points_checkpoint_in_qwen2_names_imports_the_same(tmp_path):
    """The same POINTS weights with the LLM as `Qwen2ForCausalLM` under `llm.` and a Qwen2Config `llm_config` (the
    layout SGLang's POINTS1.5 loader reads) import to exactly the CustomLlama import's params; each family refuses
    the other's config with the family to use."""
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(tiny_tower(tmp_path), dtype=torch.float32)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-5, rope_theta=1e6))
    randomize_torch(llm, seed=9)
    projector = PatchMerger(dim=32, context_dim=64)
    randomize_torch(projector, seed=10)
    visual = {f"vision_encoder.{k}": v for k, v in tower.state_dict().items()}
    visual |= {f"vision_projector.{k}": v for k, v in projector.state_dict().items()}
    custom = {k: v for k, v in _points_state_dict(llm).items() if not k.startswith("vision_encoder.")} | visual
    named = {f"llm.{k}": v for k, v in llm.state_dict().items()} | visual
    custom_config = llm_config(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                               num_kv_heads=KV_HEADS, ffn_hidden_size=48, layernorm_epsilon=1e-5, rotary_emb_base=1e6)
    imported = {}
    for family, state, config in (("points", custom, custom_config), ("points_qwen2", named, llm.config.to_dict())):
        (tmp_path / family).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / family / "model.safetensors"))
        (tmp_path / family / "config.json").write_text(json.dumps(dict(vision_config=tower.config.to_dict(),
                                                                       llm_config=config)))
        source = Source(str(tmp_path / family), family)
        model = model_config([source], BASE, "float32")
        imported[family] = model, {k: np.asarray(v) for k, v in import_params([source], model, MESH).items()}
    (a_model, a), (b_model, b) = imported["points"], imported["points_qwen2"]
    assert a_model.to_dict() == b_model.to_dict()
    assert a.keys() == b.keys() and [k for k in a if not np.array_equal(a[k], b[k])] == []
    with pytest.raises(ConversionError, match="--family points_qwen2"):
        model_config([Source(str(tmp_path / "points_qwen2"), "points")], BASE, "float32")
    with pytest.raises(ConversionError, match="--family points$"):
        model_config([Source(str(tmp_path / "points"), "points_qwen2")], BASE, "float32")


def _tiny_qwen2_vl(tmp_path) -> str:
    """A tiny random Qwen2VLForConditionalGeneration (image token inside its vocab) saved by transformers."""
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4, mlp_ratio=2),
        text_config=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, bos_token_id=0,
                         rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4)),
        image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
    hf = transformers.Qwen2VLForConditionalGeneration(config).eval()
    randomize_torch(hf, seed=2)
    hf.save_pretrained(str(tmp_path / "qwen2vl"))
    return str(tmp_path / "qwen2vl")


def test_whole_qwen2_vl_checks_and_round_trips(tmp_path):
    path = _tiny_qwen2_vl(tmp_path)
    report = check(path, BASE, MESH)
    assert report["family"] == "qwen2_vl" and set(report) >= {"vision_features", "projector", "logits"}
    assert report["max_abs_diff"] <= 1e-5, report
    import_checkpoint(path, str(tmp_path / "ckpt"), BASE, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    assert_same_safetensors(f"{path}/model.safetensors", str(tmp_path / "out" / "model.safetensors"))
    exported, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert exported.config.text_config.rope_parameters["mrope_section"] == [1, 1, 2]
    assert exported.config.image_token_id == 90


def test_real_size_tower_and_merger_have_torch_parameter_counts():
    """Qwen2-VL-7B's vision config (POINTS1.5's tower): vlm_jax shapes (eval_shape) vs the torch module's."""
    hf = transformers.Qwen2VLVisionConfig()
    model = BASE.copy_and_resolve_references()
    for name, values in qwen2_vl.model_config(hf.to_dict()).items():
        model[name].update(values)
    shapes = abstract_params(model, PARTS)
    with torch.device("meta"):
        tower = Qwen2VisionTransformerPretrainedModel(hf)
    count = {part: sum(int(np.prod(v.shape)) for k, v in shapes.items() if k.startswith(part)) for part in PARTS}
    assert count["connector"] == sum(p.numel() for p in tower.merger.parameters()) == 44_575_744
    assert count["vision"] == sum(p.numel() for n, p in tower.named_parameters() if not n.startswith("merger."))


def test_points_export_import_round_trip(tmp_path):
    """convert.py export of a POINTS1.5 import writes the POINTS layout back bit for bit, and it re-imports."""
    src = tmp_path / "points"
    src.mkdir()
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(tiny_tower(tmp_path), dtype=torch.float32)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM))
    randomize_torch(llm, seed=7)
    projector = PatchMerger(dim=32, context_dim=64)
    randomize_torch(projector, seed=8)
    state = {k: v for k, v in _points_state_dict(llm).items() if not k.startswith("vision_encoder.")}
    state |= {f"vision_encoder.{k}": v for k, v in tower.state_dict().items() if not k.startswith("merger.")}
    state |= {f"vision_projector.{k}": v for k, v in projector.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = dict(architectures=["POINTSV15ChatModel"], vision_config=tower.config.to_dict(), llm_config=llm_config(
        vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=KV_HEADS,
        ffn_hidden_size=48, layernorm_epsilon=1e-5, rotary_emb_base=1e6))
    (src / "config.json").write_text(json.dumps(config))
    import_checkpoint(str(src), str(tmp_path / "ckpt"), BASE, MESH, family="points")
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(state)
    assert [k for k in state if not torch.equal(state[k], got[k])] == []
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["POINTSV15ChatModel"] and written["llm_config"]["num_kv_heads"] == KV_HEADS
    import_checkpoint(str(tmp_path / "out"), str(tmp_path / "back"), BASE, MESH, family="points")
