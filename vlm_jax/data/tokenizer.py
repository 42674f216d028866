"""Tokenizer loading: any Hugging Face tokenizer directory, or the built-in demo byte-level BPE."""

import dataclasses
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlm_jax.data.conversation import IMAGE_MARKER

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo_tokenizer")
_PROBE = "Hello world 123, <ok>\n"


def load_tokenizer(path: str = "") -> PreTrainedTokenizerBase:
    """Loads the tokenizer in directory `path` (data.tokenizer); empty loads the built-in demo one.

    Checks that it round-trips text, because some loaders (e.g. transformers 5's
    LlamaTokenizer(vocab_file=...)) silently build an empty tokenizer.
    """
    path = path or DEMO_TOKENIZER_DIR
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.tokenizer: tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"data.tokenizer: cannot load a tokenizer from {path}: {e}") from e
    ids = tok.encode(_PROBE, add_special_tokens=False)
    if not ids or len(tok) < 2:
        raise ValueError(f"data.tokenizer: tokenizer loaded from {path} is empty (vocab {len(tok)}, "
                         f"{_PROBE!r} -> {ids})")
    return tok


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    image: int
    bos: int | None
    eos: int


def special_ids(tok: PreTrainedTokenizerBase, image_token_id: int | None = None) -> SpecialIds:
    """Placeholder, bos and eos ids.

    The image placeholder is the `<image>` token when the vocabulary has one, else image_token_id, which may lie
    outside the vocabulary (LLaVA-1.5's -200 beside Vicuna's 32000 tokens); bos is None for tokenizers without
    one (Qwen).
    """
    vocab = tok.get_vocab()
    if IMAGE_MARKER in vocab:
        image = vocab[IMAGE_MARKER]
    elif image_token_id is not None:
        image = image_token_id
    else:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no {IMAGE_MARKER} token; set "
                         f"data.image_token_id to the placeholder id")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos token")
    return SpecialIds(image=image, bos=tok.bos_token_id, eos=tok.eos_token_id)
