"""Records/s the data pipeline reads, decodes, preprocesses, tokenises and packs, per data.workers, against the rate
that POINTS1.5-7B stage 2 on a v5p-16 consumes. Prints one JSON line.

  PYTHONPATH=. python bench/data.py [--workers 0,1,2 --seconds 6 --records 1500 --images 96]

Three pipelines, each the real data path (make_train_iterator: source, ReadExample, the packer) timed for
`--seconds` after its first batch (which pays for starting the worker processes and filling the first window),
once per worker count (0: data.threads=2 threads of this process):
  * synthetic: configs/demo.py's built-in shapes source (64-448 px images, 224 px tiles, 2 tiles at most);
  * points15_navit: configs/points15_7b.py:stage2's preprocessing (NaViT at WePOINTS' pixel range 56x56 to
    1280 x 28 x 28, qwen2_vl template, rows of 4096 tokens and 11672 patch slots in groups of 4) on a LLaVA-like
    mix written to a temporary folder;
  * llava15_clip336: configs/sharegpt4v_7b.py:stage2's, which is LLaVA-1.5's (pad to square, CLIP's resize to 336
    and centre crop, vicuna_v1, rows of 2048 tokens), on the same mix.
The measuring batches are smaller than the real ones (4 or 8 rows, NaViT windows of 32 examples) so that a few
seconds hold several of them; a record costs the same in any batch. The mix: `--images` JPEG files (quality 90) drawn
as bench/packing.py documents the LLaVA-665k-like sizes (photos 60 %, long side 480-1024; scanned pages 20 %,
1240-1700 x 1754-2200; screenshots 20 %, desktop or phone): smooth colour fields (white pages) with sensor noise (a
little on pages, none on screenshots) and text-like lines on pages and screenshots; `--records` LLaVA JSON records
referencing them, text lengths from bench/packing.py's TEXT (VQA-style multi-turn, detailed, region and 9 % ShareGPT
text-only), written in words that the demo tokenizer keeps whole, so a record of N text tokens is N tokens there too
(a real 150 k-vocabulary BPE tokenises at a similar cost a token); text is capped at 1300 tokens so that every
record fits both row lengths.

The rate needed: POINTS1.5-7B stage 2 as shipped (batch_size 32 x seq_len 4096 tokens a step, docs/scale.md's
v5p:2x2x2 row), its model FLOPs a step from train/flops.py's count (the model built abstractly, nothing compiled),
the step time at the v5p's peak bf16 rate and at 40 % MFU; records a step are 32 rows x the examples a row holds
when the real packer (window 512, groups of 4) packs the mix, counted from the records' headers as data.epochs
counts. Host cores: the rate a v5p host must supply (4 chips a host) over the measured rate of one worker process.
"""

import argparse
import json
import math
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from packing import TEXT, image_kind_size  # bench/packing.py, beside this file
from vlm_jax.config import load_config
from vlm_jax.data.epochs import count_epochs
from vlm_jax.data.pipeline import make_source, make_train_iterator, row_layout
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.train.loop import Setup
from vlm_jax.train.flops import CHIPS, model_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_CAP = 1300  # text tokens of a record at most: with its image's tokens it fits a 2048-token row
CHIPS_PER_HOST = 4  # a v5p host (VM) drives 4 chips
SLICE_CHIPS = 8  # v5p:2x2x2, POINTS1.5-7B's slice (configs/points15_7b.py, docs/scale.md)
MFU = 0.4
NOISE = {"photo": 6.0, "document": 3.0, "screenshot": 0.0}  # sensor and scanner noise (std, of 255)


def write_image(rng: np.random.Generator, path: str) -> str:
    """A JPEG of one bench/packing.py size and kind (returned): a smooth colour field (a white page for a
    document) with the kind's noise; documents and screenshots get dark text-like lines."""
    kind, h, w = image_kind_size(rng)
    if kind == "document":
        pixels = np.full((h, w, 3), 245.0)
    else:
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, np.float32)
    if kind != "photo":  # lines of words
        for top in range(int(rng.integers(40, 120)), h - 40, int(rng.integers(28, 40))):
            x = int(rng.integers(30, 80))
            while x < w - 120:
                width = int(rng.integers(20, 110))
                pixels[top:top + 14, x:x + width] = rng.integers(0, 60)
                x += width + int(rng.integers(8, 16))
    pixels += rng.normal(0, NOISE[kind], pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return kind


def write_mix(root: str, records: int, images: int, words: list[str], seed: int = 0) -> dict:
    """The LLaVA-like mix in `root` (data.json, imgs/); returns the image files' mean sizes."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "imgs"))
    sizes = {}
    for i in range(images):
        path = os.path.join(root, "imgs", f"{i}.jpg")
        sizes.setdefault(write_image(rng, path), []).append(os.path.getsize(path))
    weights = np.array([w for w, *_ in TEXT])
    items = []
    for i, kind in enumerate(rng.choice(len(TEXT), size=records, p=weights / weights.sum())):
        _, median, sigma, has_image = TEXT[kind]
        tokens = min(TEXT_CAP, max(8, int(rng.lognormal(math.log(median), sigma))))
        pairs = int(rng.integers(1, 5)) if kind == 0 else 1
        turns = []
        for _ in range(pairs):
            asked = max(3, tokens // (4 * pairs))
            turns += [{"from": "human", "value": " ".join(rng.choice(words, asked)) + "?"},
                      {"from": "gpt", "value": " ".join(rng.choice(words, max(1, tokens // pairs - asked)))}]
        item = {"id": f"mix-{i}", "conversations": turns}
        if has_image:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            item["image"] = f"imgs/{int(rng.integers(images))}.jpg"
        items.append(item)
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(items, f)
    return {kind: round(float(np.mean(s)) / 1024) for kind, s in sizes.items()}


def whole_words(tokenizer) -> list[str]:
    """Words the tokenizer keeps as one token after a space (byte-level BPE's 'Ġword')."""
    return sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)


def records_per_s(config, tokenizer, workers: int, seconds: float) -> float:
    """Records the training iterator of `config` with data.workers=`workers` packs a second (the packed segments
    of its batches), timed from its first batch for at least `seconds`."""
    config = config.copy_and_resolve_references()
    config.data.workers = workers
    it = make_train_iterator(config, tokenizer)
    try:
        next(it)
        packed, begun = 0, time.perf_counter()
        while time.perf_counter() - begun < seconds:
            packed += int(next(it)["segment_ids"].max(axis=1).sum())
        return packed / (time.perf_counter() - begun)
    finally:
        it.close()


def examples_per_row(config, tokenizer) -> float:
    """Examples a row holds when `config`'s packer packs one epoch of its source: data/epochs.py's count, from the
    records' headers (no pixels decoded); every record of the mix fits a row, and one that did not would stop it."""
    config = config.copy_and_resolve_references()
    config.total_steps, config.data.epochs, config.data.skip_too_long = 0, 1, False
    (units,) = count_epochs(config, tokenizer, [0])[0]
    return len(make_source(config, "train")) / (units * row_layout(config).group)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="data.workers values, comma-separated")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per pipeline and worker count")
    p.add_argument("--records", type=int, default=1500)
    p.add_argument("--images", type=int, default=96)
    a = p.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    load = round(os.getloadavg()[0], 2)  # other work on the machine slows every figure
    tokenizer = load_tokenizer("")
    data = {"data.source": "llava_json", "data.tokenizer": "", "data.skip_too_long": "True", "data.threads": "2",
            "total_steps": "1000", "data.epochs": "0"}
    with tempfile.TemporaryDirectory() as root:
        image_kb = write_mix(root, a.records, a.images, whole_words(tokenizer))
        data["data.path"] = os.path.join(root, "data.json")
        points = load_config(os.path.join(ROOT, "configs/points15_7b.py:stage2"),
                             [f"{k}={v}" for k, v in data.items()])
        pipelines = {
            "synthetic": load_config(os.path.join(ROOT, "configs/demo.py"), ["batch_size=8", "data.threads=2"]),
            "points15_navit": load_config(os.path.join(ROOT, "configs/points15_7b.py:stage2"),
                                          [f"{k}={v}" for k, v in data.items()] + ["batch_size=4",
                                                                                   "data.pack_window=32"]),
            "llava15_clip336": load_config(os.path.join(ROOT, "configs/sharegpt4v_7b.py:stage2"),
                                           [f"{k}={v}" for k, v in data.items()] + ["batch_size=8"]),
        }
        rates = {name: {str(w): round(records_per_s(c, tokenizer, w, a.seconds), 1) for w in counts}
                 for name, c in pipelines.items()}
        per_row = examples_per_row(points, tokenizer)
    flops = model_flops(points, Setup(points, jax.devices()[:1]))
    step_peak = flops / (SLICE_CHIPS * CHIPS["TPU v5"].peak_flops)
    records_per_step = points.batch_size * per_row
    need_peak, need_mfu = records_per_step / step_peak, records_per_step / (step_peak / MFU)
    hosts = SLICE_CHIPS // CHIPS_PER_HOST
    one = rates["points15_navit"].get("1")
    print(json.dumps(dict(
        records_per_s=rates, cpu_cores=os.cpu_count(), load_average_before=load, seconds=a.seconds,
        mix_records=a.records, mix_images=a.images, mix_image_kb=image_kb,
        need=dict(system="points15_7b stage2", slice="v5p:2x2x2", chips=SLICE_CHIPS, hosts=hosts,
                  batch_size=points.batch_size, seq_len=points.data.seq_len,
                  tokens_per_step=points.batch_size * points.data.seq_len, model_flops_per_step=flops,
                  step_s_at_peak=round(step_peak, 3), step_s_at_40_mfu=round(step_peak / MFU, 3),
                  examples_per_row=round(per_row, 2), records_per_step=round(records_per_step, 1),
                  records_per_s_at_peak=round(need_peak, 1), records_per_s_at_40_mfu=round(need_mfu, 1),
                  host_cores_at_peak=round(need_peak / hosts / one, 2) if one else None,
                  host_cores_at_40_mfu=round(need_mfu / hosts / one, 2) if one else None))), flush=True)


if __name__ == "__main__":
    main()
