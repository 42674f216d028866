"""Image loading, CLIP normalisation and XVERSE-V any-resolution tiling (docs/architectures.md 1.5)."""

import contextlib
import io
import math

import numpy as np
from etils import epath
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vlm_jax.data.image_processor import CLIP_MEAN, CLIP_STD, ImageProcessor, apply_lut, make_lut

# Every uint8 value maps to one float per channel, so normalising is a table lookup (several times faster
# than the arithmetic), the same bits as torchvision's ToTensor + Normalize and transformers' processors.
_LUT = make_lut(1 / 255, CLIP_MEAN, CLIP_STD)

# The released grid set is every (a, b) with a*b <= 9; a config may lower that cap but not raise it.
MAX_GRID_TILES = 9


# PIL's own decompression-bomb check (a warning at Image.MAX_IMAGE_PIXELS, an error at twice it, naming neither
# the file nor the record) is off for the whole process: data.max_image_pixels replaces it, checked from the
# header in `_opened`. It is switched off once, here, rather than around each read, because the loader threads
# read images concurrently and would race on the global.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS  # what PIL allowed without a warning: data.max_image_pixels' default
Image.MAX_IMAGE_PIXELS = None

# 16-bit and 32-bit integer grey (a 16-bit PNG opens as I;16, or I): PIL's convert("RGB") clips these to 255,
# which turns a 16-bit image almost white; they are scaled from 0..65535 to 0..255 instead.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@contextlib.contextmanager
def _opened(src: str | bytes, max_pixels: int, name: str = ""):
    """The image opened lazily (header read, pixels not decoded), refused when it has more than `max_pixels`
    pixels (0: no limit). `src` is a file path (local, or any `etils.epath` path: gs://... where its filesystem
    library is installed), named in any error, or an encoded image's bytes, named by `name` (the image in its
    record). A corrupt image makes PIL's decoders raise nearly anything (OSError, SyntaxError, struct.error,
    IndexError, ...), so every error while it is open is reported as one."""
    if isinstance(src, bytes):
        what, opener = f"image {name}", contextlib.nullcontext(io.BytesIO(src))
    else:
        path = epath.Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {src}")
        what, opener = f"image file {src}", path.open("rb")
    try:
        with opener as f, Image.open(f) as img:
            too_large = pixel_problem(what, *img.size, max_pixels)
            if too_large:
                raise _TooLarge(too_large)
            yield img
    except _TooLarge as e:
        raise ValueError(str(e)) from None
    except Exception as e:
        raise ValueError(f"cannot decode {what}: {type(e).__name__}: {e}") from e


def pixel_problem(what: str, width: int, height: int, max_pixels: int) -> str | None:
    """Why image `what` of width x height is refused under the pixel limit `max_pixels` (0: none), or None."""
    if max_pixels and width * height > max_pixels:
        return (f"{what} is {width}x{height} = {width * height} pixels, more than data.max_image_pixels="
                f"{max_pixels} (a decompression bomb, or a limit to raise)")
    return None


class _TooLarge(Exception):
    """`_opened`'s pixel-limit refusal, kept apart from the decoding errors it reports as such."""


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB by PIL's convert("RGB"), as LLaVA's loader (`Image.open(f).convert("RGB")`) gave the
    released models' training images: palette images through their colours, alpha (LA, RGBA, PA, a palette's
    transparency) dropped rather than composited, CMYK by PIL's conversion, F (32-bit float) rounded and clipped to
    0..255 as PIL reads it. 16-bit grey (I;16, I;16B, and I, as which older PIL opens a 16-bit PNG) is scaled from
    0..65535 to 0..255 instead of clipped."""
    if img.mode in _WIDE_GREY:
        grey = np.asarray(img).astype(np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> Image.Image:
    """Reads an image file (a path) or an encoded image (its bytes, named `name` in errors) and returns it upright
    (its EXIF orientation applied) as RGB (`to_rgb`), as transformers' load_image does; an image of more than
    `max_pixels` pixels (0: no limit) is refused from its header, before decoding. Any error names the path, or
    `name`."""
    with _opened(src, max_pixels, name) as img:
        img = ImageOps.exif_transpose(img)
        img.load()  # decode here, inside _opened, so that a truncated or corrupt file is reported as one
    return to_rgb(img)


def image_size(src: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> tuple[int, int]:
    """(width, height) of an image file (a path) or an encoded image (its bytes, named `name` in errors) from its
    header alone (no pixels decoded), as `load_image` gives it: upright, so an EXIF orientation that turns the
    image a quarter (5 to 8) swaps the two. Refused as `load_image` refuses it when it has more than `max_pixels`
    pixels."""
    with _opened(src, max_pixels, name) as img:
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
