"""Image loading, CLIP normalisation and XVERSE-V any-resolution tiling (docs/architectures.md 1.5)."""

import contextlib
import math
import os

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vlm_jax.data.image_processor import CLIP_MEAN, CLIP_STD, ImageProcessor, apply_lut, make_lut

# Every uint8 value maps to one float per channel, so normalising is a table lookup (several times faster
# than the arithmetic), the same bits as torchvision's ToTensor + Normalize and transformers' processors.
_LUT = make_lut(1 / 255, CLIP_MEAN, CLIP_STD)

# The released grid set is every (a, b) with a*b <= 9; a config may lower that cap but not raise it.
MAX_GRID_TILES = 9


@contextlib.contextmanager
def _opened(path: str):
    """The image file opened lazily (header read, pixels not decoded), naming the path in any error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e


def load_image(path: str) -> Image.Image:
    """Reads an image file and returns it upright (its EXIF orientation applied) as RGB (PIL's conversion: alpha
    dropped), as transformers' load_image does; naming the path in any error."""
    with _opened(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (no pixels decoded), as `load_image` gives it:
    upright, so an EXIF orientation that turns the image a quarter (5 to 8) swaps the two."""
    with _opened(path) as img:
        width, height = img.size
        turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        return (height, width) if turned else (width, height)


def normalize(img: Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 image -> float32 [H, W, 3], rescaled by 1/255 then OpenAI-CLIP mean/std normalised."""
    return apply_lut(np.asarray(img), _LUT)


def custom_round(v: float) -> int:
    """XVERSE-V rounding: a fractional part above 0.5 rounds up, exactly 0.5 rounds down."""
    f = math.floor(v)
    return f + 1 if v - f > 0.5 else f


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """Grid (a, b) for an image, per XVERSE-V: a from the width, b from the height.

    The released code reads `height, width = image.size` (PIL gives (W, H)), so its "height" variable
    holds the width; `a` therefore comes from the pixel width. The allowed set is every (a, b) with
    a*b <= max_tiles (max_tiles=9 gives the released set (1,1..9),(2,1..4),(3,1..3),(4,1..2),(5..9,1)).
    An out-of-set grid goes through the released fallback chain with its constants 9, 4, 3 generalised
    to max_tiles, max_tiles // 2 and the largest square that fits, so max_tiles=9 reproduces it exactly.
    """
    if not 1 <= max_tiles <= MAX_GRID_TILES:
        raise ValueError(f"max_tiles must be in 1..{MAX_GRID_TILES}, got {max_tiles}")
    a = max(1, custom_round(width / tile_size))
    b = max(1, custom_round(height / tile_size))
    if a * b <= max_tiles:
        return a, b
    if b == 1:
        return max_tiles, 1
    if a == 1:
        return 1, max_tiles
    if b == 2 and max_tiles >= 2:
        return max_tiles // 2, 2
    if a == 2 and max_tiles >= 2:
        return 2, max_tiles // 2
    k = math.isqrt(max_tiles)
    return k, k


def view_count(width: int, height: int, tile_size: int, max_tiles: int) -> int:
    """Views `tile_image` makes of a width x height image: the global view, plus the grid's tiles unless 1x1."""
    a, b = choose_grid(width, height, tile_size, max_tiles)
    return 1 if a == b == 1 else 1 + a * b


def global_view(img: Image.Image, tile_size: int) -> np.ndarray:
    """The whole image resized to one normalised tile, float32 [S, S, 3]: the first view of `tile_image` with its
    default processor."""
    return ImageProcessor(size=(tile_size, tile_size)).apply(img)


def tile_image(img: Image.Image, tile_size: int, max_tiles: int, swap_hw: bool,
               processor: ImageProcessor | None = None) -> np.ndarray:
    """Normalised XVERSE-V views of one image: float32 [1 + a*b, S, S, 3] = [global, tiles row-major].

    `processor` (default: XVERSE-V's, a squash to S x S with CLIP's statistics) makes the global view; the tiles
    take its resample and normalisation, so with more than one tile it must be a plain squash to S x S. All of
    XVERSE-V's resizes are direct PIL bicubic (aspect ratio not preserved, no padding). With swap_hw=True
    (release parity) the image is resized to height S*a, width S*b, i.e. an a-from-width grid is laid
    out as a rows, so non-square images come out with their aspect ratio swapped; with swap_hw=False
    it is resized to height S*b, width S*a (the aspect-preserving reading). A 1x1 grid yields only the
    global view.
    """
    s = tile_size
    processor = processor or ImageProcessor(size=(s, s))
    view = processor.apply(img)
    a, b = choose_grid(img.width, img.height, s, max_tiles)
    if a == b == 1:
        return view[None]
    rows, cols = (a, b) if swap_hw else (b, a)
    grid = processor.normalize(processor.rgb(img).resize((s * cols, s * rows), processor.resample))
    # [rows*S, cols*S, 3] -> [rows, cols, S, S, 3]: tile (i, j) is the crop at row i, column j.
    tiles = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    return np.concatenate([view[None], tiles])
