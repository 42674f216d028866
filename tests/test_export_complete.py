"""Export writes everything the source had: the tensors the model does not compute with (CLIP blocks past the
feature layer, post_layernorm) are carried by import in their source dtype, through a training run started from
the import (its frozen parts untouched), through soup, and back out by export; so is the source's
image_token_index, and the tokenizer: the run takes the import's, records it, and its export carries it with the
image processor the run used. The other families' round trips: tests/test_interop_hf.py, test_interop_blip2.py (the key-bias
slice), test_interop_qwen2vl.py."""

import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs.base import get_config
from tests.helpers import randomize_torch, save_torch_model, tiny_config
from vlm_jax import parallel
from vlm_jax.checkpoints.directory import EXTRA_FILE, SOURCE_DIR, load_params
from vlm_jax.data.image_processor import PREPROCESSOR_FILE
from vlm_jax.data.tokenizer import RECORD_DIR, load_tokenizer
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import import_checkpoint, read_meta
from vlm_jax.interop.keymap import ConversionError
from vlm_jax.soup import soup
from vlm_jax.train import loop

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
# The demo tokenizer's <image>, which the fixture saves beside the model: a source whose config.json names another id
# cannot be served (vlm_jax/interop/serving.py).
IMAGE_TOKEN = 4
MAX_LENGTH = 777  # marks the source's tokenizer (the built-in demo one, saved with this setting)
# The tiny demo config's shapes (tests/helpers.py TINY), so a run of it starts from the import; 3 CLIP blocks,
# of which the model builds 2 (feature layer -2).
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
              image_size=32, hidden_act="quick_gelu")
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _save_llava(path, dtype: torch.dtype) -> str:
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION), text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, image_seq_length=4)).eval()
    randomize_torch(model, 0)
    return save_torch_model(model.to(dtype), path)


def _load(path: str, dtype: torch.dtype) -> transformers.LlavaForConditionalGeneration:
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True,
                                                                             dtype=dtype)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[str, str]:
    """(HF LLaVA directory, its import)."""
    root = tmp_path_factory.mktemp("llava")
    hf = _save_llava(root / "hf", torch.float32)
    tokenizer = load_tokenizer()
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.save_pretrained(hf)
    import_checkpoint(hf, str(root / "ckpt"), BASE, MESH)
    return hf, str(root / "ckpt")


def test_bf16_import_carries_unused_tensors_bit_exact_and_export_gives_every_tensor_back(tmp_path):
    hf = _save_llava(tmp_path / "hf", torch.bfloat16)
    import_checkpoint(hf, str(tmp_path / "ckpt"), BASE, MESH)
    meta = read_meta(str(tmp_path / "ckpt"))
    assert meta["image_token_index"] == IMAGE_TOKEN and meta["model"]["param_dtype"] == "bfloat16"
    # transformers 5 saves the tower without `vision_model.`; import keeps the names its key map reads.
    source = load_file(os.path.join(hf, "model.safetensors"))
    carried = {k for k in source if k.startswith(("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm."))}
    extra = load_file(str(tmp_path / "ckpt" / EXTRA_FILE))
    assert len(carried) == 18 and set(extra) == {k.replace(".", ".vision_model.", 1) for k in carried}
    assert all(torch.equal(extra[k.replace(".", ".vision_model.", 1)], source[k]) for k in carried)
    assert {v.dtype for v in extra.values()} == {torch.bfloat16}

    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    _assert_equal_but(hf, str(tmp_path / "out"), torch.bfloat16, ())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_token_index"] == IMAGE_TOKEN
    # An explicit index still wins (a new row after the vocabulary).
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out512"), "hf", image_token_index=512)
    config = json.loads((tmp_path / "out512" / "config.json").read_text())
    assert config["image_token_index"] == 512 and config["text_config"]["vocab_size"] == 513


def test_a_misspelt_tensor_beside_the_carried_ones_is_still_an_error(llava, tmp_path):
    hf, _ = llava
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["vision_tower.post_layernorm.wieght"] = tensors.pop("vision_tower.post_layernorm.weight")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"unexpected \(1\):\n    vision_tower.post_layernorm.wieght \[64\]"):
        import_checkpoint(str(bad), str(tmp_path / "dst"), BASE, MESH)


def _run_config(init: str, *extra: str):
    return tiny_config("model.connector.in_norm=False", "total_steps=1", "checkpoint_every=1",
                       "optim.trainable=[('connector/.*', 'train'), ('.*', 'frozen')]", f"init_params={init}",
                       *extra)


def _assert_equal_but(hf: str, out: str, dtype: torch.dtype, trained: tuple[str, ...]) -> None:
    """The exported model loads without missing or new weights, and every tensor but those under `trained`
    equals the source's bit for bit, in the same dtype."""
    want, got = _load(hf, dtype).state_dict(), _load(out, dtype).state_dict()
    assert set(want) == set(got)
    assert [k for k in want if not k.startswith(trained)
            and (want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k]))] == []


def _assert_all_but_projector_equal(hf: str, out: str) -> None:
    _assert_equal_but(hf, out, torch.float32, ("model.multi_modal_projector.",))


def test_runs_from_an_import_carry_tensors_and_ids_to_export_and_soup(llava, tmp_path):
    """A run started from the import (connector trained, the rest frozen) exports every other tensor bit for bit,
    the carried ones included, with the source's image_token_index; so does a second stage started from its
    workdir, and a soup of both. Resuming keeps the workdir's source/ as it is. Without data.tokenizer each run
    takes the tokenizer recorded with its init_params and records it; a workdir's export carries it and the run's
    image processor."""
    hf, ckpt = llava
    config = _run_config(ckpt)
    config.model.update(read_meta(ckpt)["model"])
    run = str(tmp_path / "run")
    loop.train(config, run)
    assert set(os.listdir(os.path.join(run, SOURCE_DIR))) == {"vlm_jax.json", EXTRA_FILE}
    _, meta = load_params(run, MESH)
    assert meta["family"] == "llava" and meta["image_token_index"] == IMAGE_TOKEN
    assert meta["trained"] == sorted(k for k in meta["trained"] if k.startswith("connector/")) != []
    assert load_tokenizer(os.path.join(run, RECORD_DIR)).model_max_length == MAX_LENGTH
    export_checkpoint(run, str(tmp_path / "out"), "hf")
    _assert_all_but_projector_equal(hf, str(tmp_path / "out"))
    assert load_tokenizer(str(tmp_path / "out")).model_max_length == MAX_LENGTH
    with open(os.path.join(run, PREPROCESSOR_FILE)) as f:
        assert json.loads((tmp_path / "out" / PREPROCESSOR_FILE).read_text()) == json.load(f)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_token_index"] == IMAGE_TOKEN

    stamp = os.stat(os.path.join(run, SOURCE_DIR, EXTRA_FILE)).st_mtime_ns
    loop.train(config, run)  # resumes (at its last step): source/ is not written again
    assert os.stat(os.path.join(run, SOURCE_DIR, EXTRA_FILE)).st_mtime_ns == stamp

    stage2 = _run_config(run)  # a later stage starts from the workdir
    stage2.model.update(read_meta(ckpt)["model"])
    loop.train(stage2, str(tmp_path / "stage2"))
    assert load_tokenizer(str(tmp_path / "stage2" / RECORD_DIR)).model_max_length == MAX_LENGTH
    soup([str(tmp_path / "stage2"), run], str(tmp_path / "soup"), MESH)
    for src in (str(tmp_path / "stage2"), str(tmp_path / "soup")):
        dst = str(tmp_path / f"out_{os.path.basename(src)}")
        export_checkpoint(src, dst, "hf")
        _assert_all_but_projector_equal(hf, dst)
        assert json.loads(open(os.path.join(dst, "config.json")).read())["image_token_index"] == IMAGE_TOKEN


def test_soup_refuses_sources_that_carry_other_tensors(llava, tmp_path):
    _, ckpt = llava
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    tensors = load_file(str(other / EXTRA_FILE))
    tensors["vision_tower.vision_model.post_layernorm.bias"] += 1.0
    save_file(tensors, str(other / EXTRA_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="carries other source tensors"):
        soup([ckpt, str(other)], str(tmp_path / "soup"), MESH)
    assert not (tmp_path / "soup").exists()
