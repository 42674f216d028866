"""Decoding speed of vlm_jax's `generate` against transformers' LlavaForConditionalGeneration.generate, side by
side on the same random tiny LLaVA and the same prompts. Prints one JSON line.

  python bench/generate.py [--batch 4 --new_tokens 128 --repeats 5 --prompt 24]
                           [--layers 8 --hidden 512 --ffn 1376 --heads 8 --kv_heads 4 --vocab 8192]

The model is built by transformers (a CLIP tower of 2 blocks on 32 px images, 4 visual tokens per image, and a
LLaMA decoder of the given shape, random weights), saved, imported with vlm-convert's import and loaded as a
checkpoint directory. Each of the B prompts is random text around one image's 4 image tokens, all of one length
(no padding). Both sides decode greedily, in fp32, exactly `--new_tokens` tokens (no stop: transformers with
min_new_tokens, vlm_jax with no stop sequence). tokens/s = B x new tokens / the median wall time of a whole
generate call (prefill included) over `--repeats` runs, after one warm-up run each; vlm_jax's warm-up is its
compilation (`compile_s`). `same_tokens`: the greedy ids are equal. One JAX device: run without the tests' fake
8-device XLA flag.
"""

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from configs.base import get_config
from vlm_jax import image_inputs, parallel
from vlm_jax.checkpoints.directory import load_params
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.interop.hf_import import import_checkpoint
from vlm_jax.model import VLM
from vlm_jax.params import unflat

IMAGE_SIZE, IMAGE_TOKENS = 32, 4  # 32 px CLIP images in 16 px patches, CLS dropped


def _hf_llava(a: argparse.Namespace, path: str, image_token: int) -> None:
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, patch_size=16, image_size=IMAGE_SIZE)
    text = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=False,
        # Weights of std 1/sqrt(hidden) keep the logits O(1), so greedy picks are no near-ties.
        initializer_range=a.hidden ** -0.5)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-2,
        image_seq_length=IMAGE_TOKENS))
    model.save_pretrained(path)


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 4), ("new_tokens", 128), ("repeats", 5), ("prompt", 24), ("layers", 8),
                          ("hidden", 512), ("ffn", 1376), ("heads", 8), ("kv_heads", 4), ("vocab", 8192)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    image_token = a.vocab - 1
    mesh = parallel.make_mesh(get_config().mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, image_token, (a.batch, a.prompt))
    ids[:, 2:2 + IMAGE_TOKENS] = image_token
    pixels = rng.standard_normal((a.batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        _hf_llava(a, os.path.join(tmp, "hf"), image_token)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(os.path.join(tmp, "hf"),
                                                                        dtype=torch.float32).eval()
        model = import_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"), get_config().model, mesh)
        params = unflat(load_params(os.path.join(tmp, "ckpt"), mesh)[0])
    model.dtype = "float32"

    images = image_inputs.make(model).one_image_per_row(list(pixels.transpose(0, 2, 3, 1)),
                                                        np.stack([np.flatnonzero(r == image_token) for r in ids]))
    args = (params, ids.astype(np.int32), np.ones(ids.shape, np.int32), images)
    start = time.perf_counter()
    ours = jax.jit(functools.partial(generate, VLM(model), max_new_tokens=a.new_tokens,
                                     stop=stop_sequences([]))).lower(*args).compile()
    compile_s = time.perf_counter() - start
    ours(*args).block_until_ready()  # first run: buffers allocated
    jax_s = _median_s(lambda: ours(*args).block_until_ready(), a.repeats)
    got = np.asarray(ours(*args))

    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                  pixel_values=torch.from_numpy(pixels))

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(**inputs, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               do_sample=False, pad_token_id=0)

    want = theirs()[:, a.prompt:].numpy()  # warm-up
    torch_s = _median_s(theirs, a.repeats)

    tokens = a.batch * a.new_tokens
    print(json.dumps({
        "model": f"random LLaVA: LLaMA {a.layers}x{a.hidden} (ffn {a.ffn}, heads {a.heads}/{a.kv_heads}, vocab "
                 f"{a.vocab}), CLIP 2x64 at {IMAGE_SIZE} px; prompt {a.prompt} tokens",
        "batch": a.batch, "new_tokens": a.new_tokens, "repeats": a.repeats,
        "vlm_jax_tokens_per_s": round(tokens / jax_s, 1), "transformers_tokens_per_s": round(tokens / torch_s, 1),
        "ratio": round(torch_s / jax_s, 2), "compile_s": round(compile_s, 2),
        "same_tokens": bool(np.array_equal(got, want))}))


if __name__ == "__main__":
    main()
