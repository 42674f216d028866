"""The peer model the speed benches compare on: one LLaVA-1.5-shaped model (CLIP tower, 2-layer GELU projector,
LLaMA decoder, every parameter trained with AdamW) built at random in transformers, saved, and imported into
vlm_jax through the project's own converter, so both frameworks start from the same weights. Each framework runs
in its own worker process (its peak RSS is its own), driven one request at a time over a pipe so that only one of
them computes at any moment."""

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any, Callable

# flag -> default: the peer configuration (CLIP 4 x 256 at 224 px, LLaMA 8 x 512 with GQA 8/4, vocab 32000).
SIZES = dict(vision_layers=4, vision_width=256, vision_heads=4, vision_mlp=1024, image_size=224, patch=14,
             layers=8, hidden=512, heads=8, kv_heads=4, ffn=1408, vocab=32000)
IMAGE_TOKEN = 31999  # the placeholder id; lowered to vocab - 1 for smaller vocabularies
LR = 1e-5
REMAT = "dots_attention"  # vlm_jax's model.remat_policy in the peer config


def add_size_flags(p: argparse.ArgumentParser) -> None:
    for name, default in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=default)


def size_argv(a: argparse.Namespace) -> list[str]:
    return [f"--{k}={getattr(a, k)}" for k in SIZES]


def image_token(a: argparse.Namespace) -> int:
    return min(IMAGE_TOKEN, a.vocab - 1)


def image_tokens(a: argparse.Namespace) -> int:
    return (a.image_size // a.patch) ** 2


def hf_model(a: argparse.Namespace):
    """A random transformers LlavaForConditionalGeneration of the peer shape (fp32). The features are the last
    layer's (vision_feature_layer=-1) so that both frameworks run every tower layer they build."""
    import torch
    import transformers

    torch.manual_seed(0)
    text = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(
        hidden_size=a.vision_width, intermediate_size=a.vision_mlp, num_hidden_layers=a.vision_layers,
        num_attention_heads=a.vision_heads, image_size=a.image_size, patch_size=a.patch, hidden_act="quick_gelu")
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token(a),
                                      vision_feature_layer=-1, projector_hidden_act="gelu",
                                      image_seq_length=image_tokens(a))
    return transformers.LlavaForConditionalGeneration(config).float()


def write_hf(a: argparse.Namespace, path: str) -> None:
    hf_model(a).save_pretrained(path)


def vlm_config(a: argparse.Namespace, hf_dir: str, dst: str, seq_len: int, batch_size: int):
    """The vlm_jax config of the imported peer: every parameter trained, AdamW at a constant LR, model.remat_policy
    REMAT, one global view per image (max_tiles=1), the import at `dst` (made from `hf_dir` unless it exists) as init_params."""
    import jax

    from configs.base import get_config
    from vlm_jax import parallel
    from vlm_jax.checkpoints.directory import META_FILE
    from vlm_jax.interop.hf_import import import_checkpoint

    c = get_config()
    if os.path.exists(dst):  # imported already (by another worker)
        with open(os.path.join(dst, META_FILE)) as f:
            c.model.update(json.load(f)["model"])
    else:
        c.model = import_checkpoint(hf_dir, dst, c.model, parallel.make_mesh(c.mesh, jax.devices()[:1]))
    c.init_params = dst
    c.batch_size = batch_size
    c.total_steps = 1000
    c.data.update(seq_len=seq_len, tile_size=a.image_size, max_tiles=1, max_tiles_per_row=1, swap_hw=False,
                  image_token_id=image_token(a))
    c.optim.update(trainable=[(".*", "train")], lr=LR, warmup_steps=0, schedule="constant", clip_norm=1.0)
    # The backward recomputes the elementwise work and keeps the weight products' and the attention's outputs: on a
    # CPU host that is faster as well as smaller than keeping everything, as every saved activation is memory the
    # next step faults in afresh, and the attention's output saves running it again for its output projection.
    c.model.remat_policy = REMAT
    return c


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


class Worker:
    """A child process running `script --worker NAME ...`, answering one JSON line per request line."""

    def __init__(self, script: str, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, script, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[2:4]} died (exit {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def call(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        return self._read()

    def close(self) -> dict:
        out = self.call("quit")
        self.proc.wait()
        return out


def serve(setup: Callable[[], dict], handlers: dict[str, Callable[[str], dict]]) -> None:
    """The worker's side: prints setup()'s JSON, then answers each request line `NAME [ARG]` with
    handlers[NAME](ARG); `quit` answers the process's peak RSS and ends. Real stdout carries only the answers."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr
    out.write(json.dumps(setup()) + "\n")
    for line in sys.stdin:
        name, _, arg = line.strip().partition(" ")
        if name == "quit":
            out.write(json.dumps({"peak_rss_gib": round(peak_rss_gib(), 3)}) + "\n")
            return
        out.write(json.dumps(handlers[name](arg)) + "\n")


def rounded(d: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}
