"""One image processor description for every tiled stem: what a checkpoint's `preprocessor_config.json` says
(CLIPImageProcessor, LlavaImageProcessor, BlipImageProcessor), or the data.image_* config keys, and the function
that applies it (equal to transformers' PIL processors; tests/test_image_processor.py).

Steps, in transformers' order: RGB (transformers: transparency composited onto white), pad to a square with the mean colour
(LLaVA's expand2square), resize (PIL, uint8), centre crop (zero-padded where the image is smaller), then
`float32(float64(x) * rescale)` normalised in float32. Every step before the last keeps uint8 values, so the last is
a lookup table of 256 entries per channel, computed with exactly those ops.
Where a run takes its processor from (data.image_processor) is `resolve`; docs/architectures.md 0.4 has it per system.
"""

import dataclasses
import functools
import json
import math
import os

import ml_collections
import numpy as np
from PIL import Image

from vlm_jax.data.tokenizer import RECORD_DIR, record_root

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # as published (and as transformers writes them)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN = np.array(OPENAI_CLIP_MEAN, np.float32)
CLIP_STD = np.array(OPENAI_CLIP_STD, np.float32)

RESIZES = ("squash", "shortest_edge", "none")
# A folder's processor, as transformers looks it up: a processor_config.json holding an "image_processor" entry
# wins over preprocessor_config.json.
PROCESSOR_FILE, PREPROCESSOR_FILE = "processor_config.json", "preprocessor_config.json"
# The transformers classes read, each with the defaults of the keys a file leaves out and how it reads an int
# `size` (True: a square; False: the shortest edge).
KNOWN_TYPES = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                               do_center_crop=True, default_to_square=False),
    "LlavaImageProcessor": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                do_center_crop=True, default_to_square=False),
    "BlipImageProcessor": dict(size={"height": 384, "width": 384}, crop_size=None, do_center_crop=False,
                               default_to_square=True),
}
# config.data.image_resize -> ImageProcessor.resize (the crop follows from it)
CONFIG_RESIZES = {"squash": "squash", "shortest_edge_crop": "shortest_edge"}


def make_lut(rescale: float, mean, std) -> np.ndarray:
    """float32 [3, 256]: each uint8 value of each channel as transformers' rescale + normalize compute it
    (float64 multiply, cast to float32, then float32 subtract and divide); for 1/255 and the CLIP statistics the
    same bits as torchvision's ToTensor + Normalize. [3, 256] so each channel's lookup is one contiguous take."""
    scaled = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    return np.ascontiguousarray(((scaled[:, None] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T)


def apply_lut(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [H, W, 3] through `lut` [3, 256]."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"normalisation expects an RGB uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return np.stack([lut[c].take(arr[..., c]) for c in range(3)], axis=-1)


def to_rgb(img: Image.Image, composite: bool) -> Image.Image:
    """The image as RGB: with `composite` as transformers' convert_to_rgb makes it, transparency (an alpha band, or
    a `transparency` colour, which PIL's RGB conversion of a palette image keeps) composited onto white; without,
    PIL's convert("RGB") as the released training code loads images (alpha dropped)."""
    if composite and ("A" in img.getbands() or img.info.get("transparency") is not None):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """How one image becomes float32 pixels [H, W, 3]. Defaults: XVERSE-V's / Qwen-VL's squash at 224."""

    resize: str = "squash"  # squash: to (height, width) = size | shortest_edge: shortest side to size[0] | none
    # squash: (height, width); shortest_edge: (edge,), the long side becoming floor(edge * long / short); none: ()
    size: tuple[int, ...] = (224, 224)
    crop: tuple[int, int] | None = None  # centre crop (height, width) after the resize; None: no crop
    pad_square: bool = False  # first pad to a square with int(255 * mean) per channel, image centred
    resample: int = Image.Resampling.BICUBIC  # PIL filter of the resize
    rescale: float = 1 / 255  # uint8 values are multiplied by this
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # subtracted after rescale, per channel
    std: tuple[float, float, float] = OPENAI_CLIP_STD  # then divided by, per channel
    do_normalize: bool = True  # False: mean and std are not applied (mean still gives the pad colour)
    # transformers' do_convert_rgb: transparency composited onto white (to_rgb); False: PIL's plain conversion, as
    # the released training code (LLaVA, ShareGPT4V, Qwen-VL, XVERSE-V) makes images RGB
    convert_rgb: bool = False

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"image processor resize {self.resize!r}: choose from {RESIZES}")
        sizes = {"squash": 2, "shortest_edge": 1, "none": 0}[self.resize]
        if len(self.size) != sizes or any(v < 1 for v in self.size):
            raise ValueError(f"image processor resize {self.resize!r} takes {sizes} positive sizes, got {self.size}")

    @functools.cached_property
    def lut(self) -> np.ndarray:
        if not self.do_normalize:
            return make_lut(self.rescale, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        return make_lut(self.rescale, self.mean, self.std)

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None where it follows the image."""
        if self.crop is not None:
            return self.crop
        return self.size if self.resize == "squash" else None

    def background(self) -> tuple[int, ...]:
        """The pad-to-square colour: LLaVA's expand2square and transformers both take int(255 * mean)."""
        return tuple(int(m * 255) for m in self.mean)

    def rgb(self, img: Image.Image) -> Image.Image:
        return to_rgb(img, self.convert_rgb)

    def apply(self, img: Image.Image) -> np.ndarray:
        """A PIL image of any mode -> float32 [H, W, 3]."""
        img = self.rgb(img)
        if self.pad_square and img.width != img.height:
            side = max(img.size)
            square = Image.new("RGB", (side, side), self.background())
            square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = square
        if self.resize == "squash":
            img = img.resize(self.size[::-1], self.resample)
        elif self.resize == "shortest_edge":
            short, long = sorted(img.size)
            edges = (self.size[0], int(self.size[0] * long / short))
            img = img.resize(edges if img.width <= img.height else edges[::-1], self.resample)
        arr = np.asarray(img)
        if self.crop is not None:
            arr = center_crop(arr, self.crop)
        return apply_lut(arr, self.lut)

    def normalize(self, img: Image.Image) -> np.ndarray:
        """An RGB image already at its size -> float32 [H, W, 3] (rescale and normalise only)."""
        return apply_lut(np.asarray(img), self.lut)

    def to_hf(self) -> dict:
        """The preprocessor_config.json a transformers user loads for this processor (`from_hf` reads it back)."""
        if self.resize == "shortest_edge" and self.crop is not None:
            kind = "LlavaImageProcessor" if self.pad_square else "CLIPImageProcessor"
        elif self.resize == "squash" and self.crop is None and not self.pad_square:
            kind = "BlipImageProcessor"
        else:
            kind = "LlavaImageProcessor"
        out = dict(image_processor_type=kind, do_resize=self.resize != "none", resample=int(self.resample),
                   do_rescale=True, rescale_factor=self.rescale, do_normalize=self.do_normalize,
                   image_mean=list(self.mean), image_std=list(self.std), do_convert_rgb=self.convert_rgb,
                   do_center_crop=self.crop is not None)
        if self.resize == "squash":
            out["size"] = dict(height=self.size[0], width=self.size[1])
        elif self.resize == "shortest_edge":
            out["size"] = dict(shortest_edge=self.size[0])
        if self.crop is not None:
            out["crop_size"] = dict(height=self.crop[0], width=self.crop[1])
        if kind == "LlavaImageProcessor":
            out["do_pad"] = self.pad_square
        return out

    def describe(self) -> str:
        """One line for the log."""
        if self.resize == "squash":
            what = f"squash to {self.size[0]}x{self.size[1]}"
        elif self.resize == "shortest_edge":
            what = f"shortest edge to {self.size[0]}"
        else:
            what = "no resize"
        crop = f", centre crop {self.crop[0]}x{self.crop[1]}" if self.crop else ""
        pad = f"pad to square with {self.background()}, " if self.pad_square else ""
        return (f"{pad}{what}{crop} ({Image.Resampling(self.resample).name.lower()}), x{self.rescale:.6g}, "
                f"mean {list(self.mean)}, std {list(self.std)}")


def center_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [crop_h, crop_w, C], top/left offsets (H - crop_h) // 2 as transformers takes them; where the
    image is smaller it is first zero-padded, centred with ceil((new - old) / 2) before it."""
    (h, w), (ch, cw) = arr.shape[:2], crop
    if ch > h or cw > w:
        nh, nw = max(ch, h), max(cw, w)
        padded = np.zeros((nh, nw) + arr.shape[2:], arr.dtype)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded[top:top + h, left:left + w] = arr
        arr, (h, w) = padded, (nh, nw)
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top:top + ch, left:left + cw]


def _size_dict(value, default_to_square: bool, where: str) -> dict:
    """transformers' reading of a `size` / `crop_size` value: an int is a square or a shortest edge, a pair is
    (height, width), a dict is taken as is."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        return dict(height=value, width=value) if default_to_square else dict(shortest_edge=value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return dict(height=value[0], width=value[1])
    if isinstance(value, dict):
        return value
    raise ValueError(f"{where}: cannot read size {value!r}")


def _channels(value, where: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{where}: expected 3 channel values, got {value!r}")
    return tuple(float(v) for v in values)


def from_hf(config: dict, file: str = "the processor config") -> ImageProcessor:
    """The ImageProcessor of a transformers image processor config (a preprocessor_config.json's dict, or the
    "image_processor" entry of a processor_config.json); `file` names it in errors."""
    kind = config.get("image_processor_type") or config.get("feature_extractor_type", "").replace(
        "FeatureExtractor", "ImageProcessor")
    kind = kind.removesuffix("Pil").removesuffix("Fast")
    if kind not in KNOWN_TYPES:
        raise ValueError(f"{file}: image_processor_type {kind or None!r} is not one vlm_jax reproduces "
                         f"(known: {sorted(KNOWN_TYPES)})")
    defaults = KNOWN_TYPES[kind]

    def get(key: str, default):  # a key left out or null takes the class default, as transformers does
        return default if config.get(key) is None else config[key]

    if get("do_pad", False) and kind != "LlavaImageProcessor":
        raise ValueError(f"{file}: do_pad pads a batch of {kind} outputs to one size, which vlm_jax does not do")
    size = _size_dict(get("size", defaults["size"]), defaults["default_to_square"], f"{file}: size")
    if kind == "CLIPImageProcessor" and get("use_square_size", False):  # CLIP's Kosmos-2 compatibility switch
        size = dict(height=size["shortest_edge"], width=size["shortest_edge"])
    resize, sizes = "none", ()
    if get("do_resize", True):
        if set(size) == {"height", "width"}:
            resize, sizes = "squash", (int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            resize, sizes = "shortest_edge", (int(size["shortest_edge"]),)
        else:
            raise ValueError(f"{file}: size {size} is not a (height, width) or a shortest edge vlm_jax reproduces")
    crop = None
    if get("do_center_crop", defaults["do_center_crop"]):
        crop_size = _size_dict(get("crop_size", defaults["crop_size"]), True, f"{file}: crop_size")
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    mean = _channels(get("image_mean", OPENAI_CLIP_MEAN), f"{file}: image_mean")
    std = _channels(get("image_std", OPENAI_CLIP_STD), f"{file}: image_std")
    return ImageProcessor(
        resize=resize, size=sizes, crop=crop, pad_square=bool(get("do_pad", False)),
        resample=int(get("resample", Image.Resampling.BICUBIC)),
        rescale=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0,
        mean=mean, std=std, do_normalize=bool(get("do_normalize", True)),
        convert_rgb=bool(get("do_convert_rgb", True)))


def processor_file(folder: str) -> str | None:
    """The file transformers reads a folder's image processor from, or None where it has none."""
    nested = os.path.join(folder, PROCESSOR_FILE)
    if os.path.isfile(nested) and "image_processor" in _read_json(nested):
        return nested
    plain = os.path.join(folder, PREPROCESSOR_FILE)
    return plain if os.path.isfile(plain) else None


def navit_pixel_bounds(folder: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of a folder's Qwen2-VL image processor (its min_pixels / max_pixels keys, or the
    size shortest_edge / longest_edge transformers 5 writes), None where it says neither."""
    file = processor_file(folder)
    if file is None:
        return None
    config = _read_json(file)
    config = config["image_processor"] if os.path.basename(file) == PROCESSOR_FILE else config
    size = config.get("size") or {}
    low, high = config.get("min_pixels", size.get("shortest_edge")), config.get("max_pixels", size.get("longest_edge"))
    return (int(low), int(high)) if low and high else None


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the processor config: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_processor(folder: str) -> tuple[ImageProcessor, str]:
    """(ImageProcessor, the file it came from) of a folder holding a transformers processor config."""
    file = processor_file(folder)
    if file is None:
        raise FileNotFoundError(f"{folder} has no {PREPROCESSOR_FILE} (nor a {PROCESSOR_FILE} with an "
                                "image_processor entry)")
    config = _read_json(file)
    nested = os.path.basename(file) == PROCESSOR_FILE
    return from_hf(config["image_processor"] if nested else config, file), file


def from_config(data: ml_collections.ConfigDict) -> ImageProcessor:
    """The processor the data.image_* keys describe: each image to one data.tile_size tile, made RGB as the
    released training code does (PIL's plain conversion)."""
    s = data.tile_size
    if data.image_resize not in CONFIG_RESIZES:
        raise ValueError(f"data.image_resize {data.image_resize!r}: choose from {sorted(CONFIG_RESIZES)}")
    resize = CONFIG_RESIZES[data.image_resize]
    if resize == "squash":
        return ImageProcessor(size=(s, s), pad_square=data.image_pad_square)
    return ImageProcessor(resize=resize, size=(s,), crop=(s, s), pad_square=data.image_pad_square)


def recorded_folder(path: str) -> str | None:
    """Where the processor recorded with `path` lies: an imported checkpoint directory's tokenizer/ folder (the
    source's files, vlm_jax/checkpoints/directory.py), or a training workdir (`WORKDIR[@STEP]`) itself, where the
    train command writes the processor its run used; None where neither holds one."""
    root = record_root(path)
    for folder in (os.path.join(root, RECORD_DIR), root):
        if processor_file(folder):
            return folder
    return None


def resolve(config: ml_collections.ConfigDict) -> tuple[ImageProcessor, str]:
    """(the processor of a tiled run, where it came from), as data.image_processor says: "auto" the processor
    recorded with init_params (`recorded_folder`), else the data.image_* keys; "config" the keys; anything else a
    folder holding a transformers processor config."""
    d = config.data
    choice = d.image_processor
    if choice == "auto":
        folder = recorded_folder(config.init_params) if config.init_params else None
        if folder is None:
            return from_config(d), "data.image_resize / data.image_pad_square (init_params records no processor)"
        return read_processor(folder)
    if choice == "config":
        return from_config(d), "data.image_resize / data.image_pad_square"
    if not os.path.isdir(choice):
        raise FileNotFoundError(f"data.image_processor {choice!r} is not 'auto', 'config' or a directory")
    return read_processor(choice)
