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


def randomize_torch(model, seed: int) -> None:
    """Replace HF's tiny default init with O(1) activations so parity comparisons are not trivially small."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name and "patch" not in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def save_torch_model(model, path) -> str:
    """save_pretrained into `path` (a str or pathlib path); returns it as a str."""
    model.save_pretrained(str(path))
    return str(path)
