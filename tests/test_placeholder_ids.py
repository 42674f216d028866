"""LLaVA-format data with a vocabulary that has no <image> token (Vicuna's, as the original LLaVA-1.5 and
ShareGPT4V checkpoints keep it): the placeholder id outside the vocabulary, LLaVA's -200 or the vocabulary size,
trains through the real trainer to the same finite losses, and the trained model answers prompts carrying it."""

import json
import os

import jax
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.helpers import ITEMS, ROOT, write_dataset
from vlm_jax.config import load_config
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.inference import Assistant
from vlm_jax.train import loop


def write_tokenizer(path) -> int:
    """A word-level tokenizer of ITEMS' words and the vicuna_v1 template's, without <image>; returns its size."""
    pre = pre_tokenizers.Whitespace()
    texts = [turn["value"] for item in ITEMS for turn in item["conversations"]] + ["USER: ASSISTANT:"]
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)} - {"<", ">", "image"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))
    return len(vocab)


def test_out_of_vocab_placeholders_train_and_generate(tmp_path):
    data = write_dataset(tmp_path)
    vocab = write_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert "<image>" not in tokenizer.get_vocab() and len(tokenizer) == vocab
    losses, answers = {}, {}
    for placeholder in (-200, vocab):
        config = load_config(os.path.join(ROOT, "configs/sharegpt4v_7b.py") + ":stage2,tiny", [
            "data.source=llava_json", f"data.path={data}", f"data.eval_path={data}",
            f"data.tokenizer={tmp_path / 'tok'}", f"data.image_token_id={placeholder}", "data.threads=1",
            f"model.text.vocab_size={vocab}", "total_steps=3", "checkpoint_every=0"])
        assert config.model.loss_chunk_tokens >= config.data.seq_len  # every position's logits at once, NaN before
        workdir = tmp_path / f"run{placeholder}"
        state = loop.train(config, str(workdir))
        with open(workdir / "metrics.jsonl") as f:
            losses[placeholder] = [json.loads(line)["loss"] for line in f]
        examples = make_eval_examples(config, tokenizer, len(ITEMS))
        assert (examples[0]["tokens"] == placeholder).sum() > 0
        assistant = Assistant(config, state.params, tokenizer, loop.Setup(config).mesh)
        answers[placeholder] = [c.text for c in assistant.generate(examples)]
    assert len(losses[-200]) == 3 and np.isfinite(losses[-200]).all()
    assert losses[-200][-1] < losses[-200][0]
    assert losses[-200] == losses[vocab]
    assert answers[-200] == answers[vocab] and len(answers[-200]) == len(ITEMS)
