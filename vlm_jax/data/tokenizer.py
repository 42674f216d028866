"""Tokenizer loading: any Hugging Face tokenizer directory, the one recorded with init_params, or the built-in
demo byte-level BPE."""

import dataclasses
import logging
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlm_jax.data.conversation import IMAGE_MARKER

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo_tokenizer")
_PROBE = "Hello world 123, <ok>\n"
# Where an imported checkpoint directory keeps its source's tokenizer files, and a training workdir the tokenizer
# its run used: a run or an evaluation that starts from either finds it there.
RECORD_DIR = "tokenizer"
# The files that make a folder a tokenizer (an import's tokenizer/ may hold only a tower's image processor).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


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


def record_root(path: str) -> str:
    """The folder of a checkpoint directory or `WORKDIR[@STEP]`, where its recorded files lie."""
    return path if os.path.isdir(path) else path.partition("@")[0]


def recorded_tokenizer(path: str) -> str | None:
    """The tokenizer folder recorded with `path` (a checkpoint directory or `WORKDIR[@STEP]`), None without one."""
    folder = os.path.join(record_root(path), RECORD_DIR)
    return folder if any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES) else None


def run_tokenizer(config) -> PreTrainedTokenizerBase:
    """The tokenizer of a run: data.tokenizer when set, else the one recorded with init_params
    (`recorded_tokenizer`), else the built-in demo tokenizer. Logs which."""
    d = config.data
    folder = d.tokenizer or (recorded_tokenizer(config.init_params) if config.init_params else None) or ""
    how = "data.tokenizer" if d.tokenizer else "recorded with init_params" if folder else "the built-in demo one"
    logging.info("tokenizer: %s (%s)", folder or DEMO_TOKENIZER_DIR, how)
    return load_tokenizer(folder)


def record_tokenizer(tok: PreTrainedTokenizerBase, workdir: str) -> None:
    """Saves `tok` into `workdir/tokenizer/` (once: a resumed run keeps it), where export, evaluation and a run
    that starts from this one take it."""
    folder = os.path.join(workdir, RECORD_DIR)
    if not os.path.isdir(folder):
        tok.save_pretrained(f"{folder}.partial")
        os.replace(f"{folder}.partial", folder)


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
