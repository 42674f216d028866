import importlib.util
import json
import os

import pytest

from vlm_jax.data.tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer, special_ids

TEXTS = ["What color is the triangle?", " a red circle, a blue square and an orange star.\n",
         "Ünïcödé — 漢字 🙂 tabs\tand  double  spaces", "USER: <image>\nq ASSISTANT: 3</s>", ""]


def test_demo_tokenizer_round_trips_any_text():
    tok = load_tokenizer("")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Byte-level: every byte has a token, so nothing maps to <unk>.
    ids = tok.encode(bytes(range(1, 256)).decode("latin-1"), add_special_tokens=False)
    assert tok.unk_token_id not in ids


def test_demo_special_tokens():
    tok = load_tokenizer("")
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == "<pad>"
    ids = special_ids(tok)
    assert tok.convert_ids_to_tokens([ids.image, ids.bos, ids.eos]) == ["<image>", "<s>", "</s>"]
    assert tok.encode("<image><|im_end|>", add_special_tokens=False) == [ids.image, tok.get_vocab()["<|im_end|>"]]
    assert 400 < len(tok) <= 512


def test_image_id_fallback_and_errors(tmp_path):
    tok = load_tokenizer("")
    vocab = dict(tok.get_vocab())
    assert special_ids(tok, 999).image == vocab["<image>"]  # the vocab token wins
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_tokenizer(str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(str(tmp_path))


def test_build_script_reproduces_asset(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "build_tokenizer", os.path.join(os.path.dirname(__file__), "..", "launch", "build_tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(str(tmp_path), 512, 4000)
    with open(tmp_path / "tokenizer.json") as f, open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer.json")) as g:
        assert json.load(f)["model"] == json.load(g)["model"]


def test_image_id_from_config_when_vocab_lacks_it():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert special_ids(tok, 32000).image == 32000
    with pytest.raises(ValueError, match="data.image_token_id"):
        special_ids(tok)
