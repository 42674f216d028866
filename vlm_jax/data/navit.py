"""NaViT inputs (Qwen2-VL vision tower, as POINTS1.5 uses it; docs/architectures.md 2.2 and 2.4): smart_resize,
patches in the processor's order, their 2-D positions, and images packed into one fixed-length row.

One image -> `navit_patches` -> patches [N, C*T*p*p] float32 and grid (t, h, w) in patches, N = t*h*w. The
pixels equal transformers' `Qwen2VLImageProcessor` (the PIL backend) bit for bit: smart_resize, PIL bicubic,
rescale 1/255 and CLIP mean/std (one table lookup: images.normalize computes the same float32 values as
HF's float64 rescale followed by a float32 normalise), then patches ordered (t, h/m, w/m, m, m) - raster
over m x m windows (m = merge_size), raster inside each window - each flattened in (C, T, kh, kw) order
with the single frame repeated over the T = temporal_patch_size slots.

Several images -> `pack_patches` -> one row of `max_patches` slots: the images' patches back to back,
`patch_positions` [max_patches, 2] (row, col) of each patch inside its own image (the 2-D RoPE ids), and
`patch_segment_ids` (1, 2, ... per image, 0 = padding). Every image holds a multiple of m*m patches, so with
max_patches a multiple of m*m each run of m*m slots is one window of one image (or padding), which is what
the PatchMerger connector groups.

`mrope_positions` gives the Qwen2-VL decoder's 3-axis positions of one example (text runs and image runs);
`example_mrope_positions` those of a tokenised example from where its images' placeholder runs start.
"""

import math

import numpy as np
from PIL import Image

from vlm_jax.data.images import normalize
from vlm_jax.errors import BadRecordError

# transformers' Qwen2VLImageProcessor defaults (= WePOINTS' helper); Qwen2-VL's own preprocessor_config.json
# ships max_pixels 12,845,056.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) to resize to: both multiples of `factor`, pixel count within [min_pixels, max_pixels]
    (up to the rounding to `factor`), aspect ratio kept as closely as possible. HF's rule, including Python's
    round-half-to-even; images under `factor` px are scaled up rather than refused (as POINTS' variant)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        # A record's image that no NaViT run can take: a bad record, named by the stream that reads it.
        raise BadRecordError(f"the aspect ratio {max(height, width) / min(height, width):.1f} of its {width}x{height} "
                             f"image exceeds {MAX_ASPECT}", "image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def navit_grid(width: int, height: int, *, patch_size: int = 14, merge_size: int = 2, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """The patch grid (1, h, w) `navit_patches` gives a width x height image (smart_resize to whole merge windows)."""
    height, width = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, height // patch_size, width // patch_size


def navit_patches(
    img: Image.Image, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB image -> (patches float32 [h*w, 3*T*p*p], grid (1, h, w)) in the processor's order (module doc)."""
    if img.mode != "RGB":
        raise ValueError(f"navit_patches expects an RGB image, got mode {img.mode!r}")
    _, gh, gw = navit_grid(img.width, img.height, patch_size=patch_size, merge_size=merge_size,
                           min_pixels=min_pixels, max_pixels=max_pixels)
    m, p = merge_size, patch_size
    pixels = normalize(img.resize((gw * p, gh * p), resample=Image.Resampling.BICUBIC))  # [H, W, 3]
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)  # (h/m, w/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * temporal_patch_size * p * p)), (1, gh, gw)


def patch_positions(grid: tuple[int, int, int], merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch of one image, int32 [t*h*w, 2], in the patch order of `navit_patches`
    (HF `get_vision_position_ids`; frames of a video repeat the same ids)."""
    t, h, w = grid
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {grid} is not a whole number of {merge_size}x{merge_size} windows")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    window_order = [a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3).ravel()
                    for a in (rows, cols)]
    return np.tile(np.stack(window_order, axis=-1), (t, 1)).astype(np.int32)


def pack_patches(
    images: list[tuple[np.ndarray, tuple[int, int, int]]], max_patches: int, patch_dim: int = 3 * 2 * 14 * 14,
    merge_size: int = 2,
) -> dict[str, np.ndarray]:
    """Images (patches, grid) -> one row: `patches` [max_patches, D] float32, `patch_positions`
    [max_patches, 2] int32, `patch_segment_ids` [max_patches] int32 (module docstring)."""
    if max_patches % merge_size ** 2:
        raise ValueError(f"max_patches {max_patches} must be a multiple of {merge_size ** 2} (one merge window)")
    total = sum(p.shape[0] for p, _ in images)
    if total > max_patches:
        raise ValueError(f"{len(images)} images hold {total} patches, more than max_patches={max_patches}")
    out = dict(patches=np.zeros((max_patches, patch_dim), np.float32),
               patch_positions=np.zeros((max_patches, 2), np.int32),
               patch_segment_ids=np.zeros((max_patches,), np.int32))
    start = 0
    for i, (patches, grid) in enumerate(images):
        if patches.shape != (math.prod(grid), patch_dim):
            raise ValueError(f"image {i}: patches {patches.shape} for grid {grid}, expected [{math.prod(grid)}, "
                             f"{patch_dim}]")
        end = start + patches.shape[0]
        out["patches"][start:end] = patches
        out["patch_positions"][start:end] = patch_positions(grid, merge_size)
        out["patch_segment_ids"][start:end] = i + 1
        start = end
    return out


def mrope_positions(pieces: list[int | tuple[int, int, int]], merge_size: int = 2) -> np.ndarray:
    """Qwen2-VL M-RoPE ids, int32 [L, 3] (temporal, row, col), of one example laid out as `pieces`: an int is a
    run of that many text tokens, a grid (t, h, w) one image's placeholder run of t*h*w / merge_size**2 tokens
    (HF `get_rope_index`). Text counts on from the running position p on all three axes; the image token at
    merged (frame, row, col) gets (p + frame, p + row, p + col), and p then moves on by max(h, w) / merge_size."""
    out, p = [], 0
    for piece in pieces:
        if isinstance(piece, int):
            out.append(np.repeat(np.arange(p, p + piece)[:, None], 3, axis=1))
            p += piece
            continue
        t, h, w = piece[0], piece[1] // merge_size, piece[2] // merge_size
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), axis=-1)
        out.append(grid.reshape(-1, 3) + p)
        p += max(h, w)
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 3), np.int32)


def example_mrope_positions(
    length: int, image_starts: list[int] | np.ndarray, grids: list[tuple[int, int, int]], merge_size: int = 2,
) -> np.ndarray:
    """`mrope_positions` [length, 3] of `length` tokens in which image i (grid (t, h, w)) has its placeholder run
    of t*h*w / merge_size**2 tokens at image_starts[i]; every other token is text."""
    pieces: list[int | tuple[int, int, int]] = []
    at = 0
    for start, grid in zip(image_starts, grids, strict=True):
        pieces += [int(start) - at, tuple(grid)]
        at = int(start) + math.prod(grid) // merge_size ** 2
    return mrope_positions(pieces + [length - at], merge_size)
