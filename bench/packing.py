"""Padding of packed NaViT batches at 7B-run shapes vs the same examples padded one per row. Prints one JSON line.

  python bench/packing.py [--seq_len 4096 --max_patches 11672 --max_images 16 --window 1024 --group 8]

Nothing is downloaded and no pixels are made: example sizes are drawn from documented distributions and run
through the real preprocessing arithmetic (navit.smart_resize at WePOINTS' pixel range) and the real row
budgets and planners (data/packing.py NavitRows; plan_groups for `--group` rows sharing their vision rows,
data.vision_group_rows, with examples carried from window to window as the pipeline does; plan_rows for rows
that hold their own images). Counts padding only; times nothing.

The mix (per example; one image unless text-only):
  * images: photos 60 % (COCO / LAION-like: long side 480-1024 px, aspect 4:3, 3:4, 16:9, 1:1), documents 20 %
    (scanned or rendered pages, 150-200 dpi: 1240-1700 x 1754-2200 px, 0.71-0.77 aspect), screenshots 20 %
    (desktop 1280x720 - 2560x1440, mobile 390x844 - 1170x2532);
  * conversation text, LLaVA-665k-like: VQA-style short multi-turn (VQAv2, GQA, OKVQA, OCR-VQA, TextCaps) 55 %,
    median 110 tokens; LLaVA-Instruct conversations / detail / reasoning 30 %, median 330; RefCOCO / VG region
    turns 6 %, median 200; ShareGPT text-only 9 % (40 k of 665 k), median 800 and a long tail to the context.
    Lengths are log-normal around those medians; anything over seq_len is cut to it.
"""

import argparse
import json
import math

import numpy as np

from vlm_jax.data.navit import MAX_PIXELS, MIN_PIXELS, smart_resize
from vlm_jax.data.packing import NavitRows, plan_groups, plan_rows

# (weight, median text tokens, log-normal sigma, has an image)
TEXT = [(0.55, 110, 0.6, True), (0.30, 330, 0.5, True), (0.06, 200, 0.6, True), (0.09, 800, 0.9, False)]


IMAGE_KINDS = ("photo", "document", "screenshot")


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) in pixels of one photo, document or screenshot."""
    return image_kind_size(rng)[1:]


def image_kind_size(rng: np.random.Generator) -> tuple[str, int, int]:
    """(IMAGE_KINDS entry, height, width in pixels) of one photo, document or screenshot."""
    kind = rng.choice(3, p=[0.6, 0.2, 0.2])
    if kind == 0:
        long = rng.integers(480, 1025)
        aspect = rng.choice([4 / 3, 3 / 4, 16 / 9, 1.0])
        w, h = (long, long / aspect) if aspect >= 1 else (long * aspect, long)
    elif kind == 1:
        h = rng.integers(1754, 2201)
        w = h * rng.uniform(0.71, 0.77)
    elif rng.random() < 0.6:
        w = rng.choice([1280, 1366, 1440, 1536, 1920, 2560])
        h = w * 9 / 16
    else:
        w = rng.choice([390, 414, 750, 1080, 1170])
        h = w * rng.uniform(2.0, 2.17)
    return IMAGE_KINDS[kind], int(h), int(w)


def text_kinds(rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of the conversation kind: indices into TEXT, by its weights."""
    weights = np.array([w for w, *_ in TEXT])
    return rng.choice(len(TEXT), size=n, p=weights / weights.sum())


def text_length(rng: np.random.Generator, kind: int) -> tuple[int, bool]:
    """(text tokens, whether it has an image) of one conversation of TEXT[kind], not yet cut to any seq_len."""
    _, median, sigma, has_image = TEXT[kind]
    return max(8, int(rng.lognormal(math.log(median), sigma))), has_image


def sample_examples(rng: np.random.Generator, n: int, seq_len: int, merge: int = 2,
                    patch: int = 14) -> list[tuple[int, int, int]]:
    """n examples as (tokens, patches, images) costs; an image's run is patches / merge**2 tokens."""
    out = []
    for kind in text_kinds(rng, n):
        text, has_image = text_length(rng, kind)
        patches = 0
        if has_image:
            h, w = smart_resize(*image_size(rng), factor=patch * merge, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            patches = (h // patch) * (w // patch)
        tokens = min(seq_len, text + patches // merge ** 2)
        out.append((tokens, patches, int(has_image)))
    return out


def stream_rows(costs: list[tuple[int, ...]], limits: tuple[int, ...]) -> list[list[int]]:
    """Rows of consecutive examples (data.pack_window=0): the first example that does not fit opens a row."""
    rows, used = [[]], [0] * len(limits)
    for i, cost in enumerate(costs):
        total = [u + c for u, c in zip(used, cost)]
        if any(t > lim for t, lim in zip(total, limits)):
            rows.append([])
            total = list(cost)
        rows[-1].append(i)
        used = total
    return rows


def padding(rows: int, costs: list[tuple[int, int, int]], seq_len: int, max_patches: int) -> tuple:
    """(LLM, vision) padding fractions of `rows` rows holding every example of `costs`."""
    tokens = sum(c[0] for c in costs)
    patches = sum(c[1] for c in costs)
    return 1 - tokens / (rows * seq_len), 1 - patches / (rows * max_patches)


def grouped_rows(costs: list[tuple[int, ...]], layout: NavitRows, window: int) -> int:
    """Rows that plan_groups fills with every example, window after window, each passing on what it could not
    fit (the pipeline's data.vision_group_rows path); the last window places everything."""
    groups, carried, start = 0, [], 0
    while start < len(costs) or carried:
        indices = carried + list(range(start, min(start + window, len(costs))))
        start += window
        planned, left = plan_groups([costs[i][0] for i in indices], [[costs[i][1]] * costs[i][2] for i in indices],
                                    layout, carried=len(carried), flush=start >= len(costs))
        groups += len(planned)
        carried = [indices[i] for i in left]
    return groups * layout.group


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq_len", type=int, default=4096)
    # The mix's own ratio: 2,965 patches / 1,040 tokens an example x 4096 tokens, a multiple of 4.
    p.add_argument("--max_patches", type=int, default=11672)
    p.add_argument("--max_images", type=int, default=16)
    p.add_argument("--max_examples", type=int, default=64)
    p.add_argument("--window", type=int, default=1024, help="examples planned together (data.pack_window)")
    p.add_argument("--group", type=int, default=8, help="rows sharing their vision rows (data.vision_group_rows)")
    p.add_argument("--examples", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    layout = NavitRows(a.seq_len, a.max_patches, a.max_images, patch_dim=1, merge_size=2,
                       max_examples_per_row=a.max_examples, group=a.group)
    limits = tuple(limit for _, _, limit in layout.budgets)
    costs = [c + (1,) for c in sample_examples(np.random.default_rng(a.seed), a.examples, a.seq_len)]
    fits = [c for c in costs if all(x <= lim for x, lim in zip(c, limits))]
    rows = grouped_rows(fits, layout, a.window)
    own = sum(len(plan_rows(fits[start:start + a.window], limits)) for start in range(0, len(fits), a.window))
    figures = dict(zip(("llm_padding_fraction", "vision_padding_fraction"),
                       padding(rows, fits, a.seq_len, a.max_patches)))
    for name, count in (("rows_own_images", own), ("one_per_row", len(fits)),
                        ("stream_order", len(stream_rows(fits, limits)))):
        llm, vision = padding(count, fits, a.seq_len, a.max_patches)
        figures.update({f"{name}_llm_padding_fraction": llm, f"{name}_vision_padding_fraction": vision})
    print(json.dumps(dict(
        {k: round(v, 4) for k, v in figures.items()},
        seq_len=a.seq_len, max_patches_per_row=a.max_patches, max_images_per_row=a.max_images,
        vision_group_rows=a.group, pack_window=a.window, examples=len(fits),
        dropped_over_budget=len(costs) - len(fits), rows=rows,
        mean_tokens=round(float(np.mean([c[0] for c in fits])), 1),
        mean_patches=round(float(np.mean([c[1] for c in fits])), 1))), flush=True)


if __name__ == "__main__":
    main()
