"""Helpers shared by several test files."""

from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.data.tokenizer import load_tokenizer


def first_batch(config, tokenizer=None) -> dict:
    """The first training batch of `config`, closing the iterator's prefetch thread."""
    it = make_train_iterator(config, tokenizer or load_tokenizer(config.data.tokenizer))
    try:
        return next(it)
    finally:
        it.close()
