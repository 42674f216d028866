"""Helpers shared by several test files."""

import json
import os

from PIL import Image

from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["batch_size=8", "data.seq_len=128", "data.max_tiles=4", "data.max_tiles_per_row=6", "model.text.layers=2",
        "model.vision.depth=2", "model.text.hidden=64", "model.text.ffn=128", "model.vision.width=64",
        "model.vision.mlp_dim=128", "log_every=1", "vision_pretrain.steps=0",
        'optim.trainable=[(".*", "train")]']


ITEMS = [
    # LLaVA-Pretrain style: marker after the instruction (moved to the front, as LLaVA does).
    {"id": "cap-1", "image": "imgs/a.png",
     "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                       {"from": "gpt", "value": "a red square"}]},
    # mix665k style multi-turn.
    {"id": "vqa-2", "image": "imgs/b.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a disc"},
                       {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}]},
    # Text-only.
    {"id": "txt-3", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
]


def write_dataset(root, items=ITEMS, name="data.json"):
    """A llava_json dataset in `root` (a pathlib path): its images, and `items` as `name`."""
    (root / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (64, 40), (200, 30, 30)).save(root / "imgs" / "a.png")
    Image.new("RGB", (90, 90), (30, 30, 200)).save(root / "imgs" / "b.png")
    (root / name).write_text(json.dumps(items))
    return root / name


def tiny_config(*extra: str):
    """The demo config shrunk to a two-layer ViT and decoder, with `key=value` overrides on top."""
    from vlm_jax.config import load_config
    return load_config(os.path.join(ROOT, "configs/demo.py"), TINY + list(extra))


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


def qwen1_state_dict(hf) -> dict:
    """A Qwen2ForCausalLM with kv heads = heads in Qwen1 (Qwen-7B/14B) names: fused block-layout c_attn,
    w1 = up, w2 = gate; plus one stray Qwen-VL tower tensor the LLM table must ignore."""
    import torch

    sd, out = hf.state_dict(), {}
    for i in range(hf.config.num_hidden_layers):
        q, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[h + f"attn.c_attn.{kind}"] = torch.cat([sd[q + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[q + "self_attn.o_proj.weight"]
        out[h + "mlp.w1.weight"] = sd[q + "mlp.up_proj.weight"]
        out[h + "mlp.w2.weight"] = sd[q + "mlp.gate_proj.weight"]
        out[h + "mlp.c_proj.weight"] = sd[q + "mlp.down_proj.weight"]
        out[h + "ln_1.weight"] = sd[q + "input_layernorm.weight"]
        out[h + "ln_2.weight"] = sd[q + "post_attention_layernorm.weight"]
    out["transformer.wte.weight"] = sd["model.embed_tokens.weight"]
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    out["transformer.visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)  # the Qwen-VL tower: not this table's
    return {k: v.contiguous() for k, v in out.items()}


def assert_reimport_bit_exact(export_dir: str, dst: str, base, mesh, model, parts, params: dict) -> None:
    """Imports `export_dir` to `dst` and checks every parameter equals `params` (flat path -> array) exactly."""
    import numpy as np

    from vlm_jax.checkpoints.params_only import restore_params
    from vlm_jax.interop.hf_import import import_checkpoint
    from vlm_jax.params import abstract_params, flat, param_shardings, unflat

    import_checkpoint(export_dir, dst, base, mesh)
    back = flat(restore_params(os.path.join(dst, "params"), unflat(abstract_params(model, parts)),
                               unflat(param_shardings(model, parts, mesh))))
    assert set(back) == set(params)
    for k in params:
        assert np.array_equal(np.asarray(back[k]), params[k]), k


def assert_same_safetensors(want_path: str, got_path: str) -> None:
    """Same tensor names, every tensor equal bit for bit, in the same dtype."""
    import torch
    from safetensors.torch import load_file

    want, got = load_file(want_path), load_file(got_path)
    assert set(want) == set(got)
    assert [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])] == []


def assert_bitwise_equal(a, b) -> None:
    """Two pytrees (train states, parameter trees) with the same leaves, every one equal bit for bit."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y, strict=True)
