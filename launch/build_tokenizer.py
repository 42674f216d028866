"""Trains the demo byte-level BPE tokenizer and writes it to vlm_jax/assets/demo_tokenizer/.

The corpus is every question, answer and caption the synthetic scenes allow (not the training mix, so
a change of mix leaves the asset as it is), wrapped in every chat
template, so the ~512-token vocabulary spends its merges on the demo's words. The full 256-byte
initial alphabet means any text still encodes (no unk) and decodes back exactly.

    .venv/bin/python launch/build_tokenizer.py [--out DIR] [--vocab_size 512] [--scenes 4000]
"""

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm_jax.data.conversation import IMAGE_MARKER, TEMPLATES
from vlm_jax.data.synthetic import all_questions, sample_scene
from vlm_jax.data.tokenizer import DEMO_TOKENIZER_DIR

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Order fixes the ids: <pad> must be 0 (the batch contract pads with 0).
SPECIALS = [PAD, BOS, EOS, UNK, IMAGE_MARKER, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")


def corpus(n_scenes: int) -> list[str]:
    lines = []
    for i in range(n_scenes):
        # Both size ranges the configs use, so captions of every shape count appear.
        s = sample_scene(0, "train", i, 48, 448)
        for t in TEMPLATES.values():
            end = EOS if t.end is None else t.end
            system = t.system.format(system=SYSTEM) if i % 2 else ""
            lines.append(system + "".join(
                t.user.format(q=q if t.keep_question else "") + t.answer.format(a=a) + end + t.after_end
                for _, q, a in all_questions(s)))
    return lines


def build(out: str, vocab_size: int, n_scenes: int) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(n_scenes), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                 unk_token=UNK, extra_special_tokens=SPECIALS[4:])
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    print(f"wrote {out}: vocab {len(hf)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEMO_TOKENIZER_DIR)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--scenes", type=int, default=4000)
    a = p.parse_args()
    build(a.out, a.vocab_size, a.scenes)
