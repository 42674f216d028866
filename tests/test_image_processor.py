"""vlm_jax's image processors against transformers' PIL processors (what AutoImageProcessor gives without
torchvision) on odd sizes and modes, the file readers, the config keys and where a run takes its processor from."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from configs.base import get_config
from tests.helpers import ROOT, first_batch, tiny_config, write_dataset
from vlm_jax.config import load_config
from vlm_jax.data.image_kinds import report_image_processor, tile_processor
from vlm_jax.data.image_processor import ImageProcessor, from_config, from_hf, read_processor, resolve
from vlm_jax.data.images import global_view, load_image, normalize
from vlm_jax.data.pipeline import make_eval_examples
from vlm_jax.data.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer("")


def _noise(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # 16-bit values around the 8-bit range, so the conversion's clipping shows
        return Image.fromarray(rng.integers(0, 400, (h, w)).astype(np.uint16))
    if mode == "P":  # a palette image whose index 0 is transparent
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert("P")
        img.info["transparency"] = 0
        return img
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (h, w, bands), np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


IMAGES = [(333, 517, "RGB"), (517, 333, "RGB"), (1, 1000, "RGB"), (1000, 1, "RGB"), (64, 64, "RGB"),
          (333, 517, "RGBA"), (120, 77, "L"), (77, 120, "P"), (97, 61, "I;16"), (50, 70, "LA")]
# Small sizes keep a 1 x 1000 image's shortest-edge resize (edge x 1000 * edge) cheap; one at LLaVA-1.5's 336.
PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}),
    "clip_crop_bigger": lambda: CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 27,
                                                                                              "width": 25}),
    "llava_pad": lambda: LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 31},
                                                crop_size={"height": 31, "width": 31}),
    "blip": lambda: BlipImageProcessorPil(size={"height": 29, "width": 35}),
    "blip_other_stats": lambda: BlipImageProcessorPil(size={"height": 24, "width": 24}, image_mean=[0.5, 0.4, 0.3],
                                                      image_std=[0.2, 0.3, 0.25], rescale_factor=1 / 256),
}


def _llava_336():
    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _reference(hf, img: Image.Image) -> np.ndarray:
    return np.asarray(hf(images=img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("w,h,mode", IMAGES)
def test_matches_transformers_pil_processor(name, w, h, mode):
    _compare(PROCESSORS[name](), _noise(w, h, mode))


@pytest.mark.parametrize("w,h,mode", [(333, 517, "RGBA"), (1, 1000, "RGB")])
def test_matches_llava_at_336(w, h, mode):
    _compare(_llava_336(), _noise(w, h, mode))


def _compare(hf, img: Image.Image) -> None:
    ours = from_hf(json.loads(hf.to_json_string()))
    want, got = _reference(hf, img), ours.apply(img)
    assert got.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
    assert np.max(np.abs(got - want)) <= 1e-6
    # The lookup table is built with transformers' own ops, so the pixels are the same bits.
    np.testing.assert_array_equal(got, want)


def _exif_rotated_jpeg(path) -> None:
    img = _noise(40, 24, "RGB", seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(path, exif=exif.tobytes(), quality=95)


def test_load_image_applies_exif_orientation_like_transformers(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(path)
    ours, theirs = load_image(str(path)), hf_load_image(str(path))
    assert ours.size == theirs.size == (24, 40)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    hf = PROCESSORS["llava_pad"]()
    np.testing.assert_array_equal(from_hf(json.loads(hf.to_json_string())).apply(ours), _reference(hf, theirs))


def test_squash_default_is_the_old_global_view():
    """The data.image_* defaults give today's squash bit for bit: PIL bicubic straight to the tile, then the float32
    ToTensor + CLIP Normalize values."""
    config = get_config()
    config.data.tile_size = 32
    processor = from_config(config.data)
    for w, h in ((333, 517), (1, 1000), (32, 32)):
        img = _noise(w, h, "RGB", seed=w)
        old = ((np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / np.float32(255)
                - np.array([0.48145466, 0.4578275, 0.40821073], np.float32))
               / np.array([0.26862954, 0.26130258, 0.27577711], np.float32))
        np.testing.assert_array_equal(processor.apply(img), old)
        np.testing.assert_array_equal(global_view(img, 32), old)
    # The demo configs (docs/experiments.md's figures) keep it: no init_params, or a workdir of one of them.
    for name in ("demo.py", "demo_recipe.py:stage1", "demo_recipe.py:stage2,tiny"):
        assert tile_processor(load_config(os.path.join(ROOT, "configs", name))) == ImageProcessor(size=(32, 32))


def test_config_keys_and_hf_round_trip():
    config = get_config()
    config.data.update(tile_size=336, image_resize="shortest_edge_crop", image_pad_square=True)
    processor = from_config(config.data)
    assert processor == ImageProcessor(resize="shortest_edge", size=(336,), crop=(336, 336), pad_square=True)
    assert processor.background() == (122, 116, 104)
    hf = LlavaImageProcessorPil(**{k: v for k, v in processor.to_hf().items() if k != "image_processor_type"})
    img = _noise(333, 517, "RGB")
    np.testing.assert_array_equal(processor.apply(img), _reference(hf, img))
    for p in (processor, from_config(get_config().data), ImageProcessor(resize="shortest_edge", size=(9,))):
        assert from_hf(p.to_hf()) == p


def test_old_style_files():
    """Files from before image processors: an int size (CLIP: the shortest edge; BLIP: a square), an int crop_size,
    a feature_extractor_type, missing keys at the class defaults."""
    clip = from_hf({"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336})
    assert (clip.resize, clip.size, clip.crop, clip.pad_square) == ("shortest_edge", (336,), (336, 336), False)
    blip = from_hf({"image_processor_type": "BlipImageProcessor", "size": 224})
    assert (blip.resize, blip.size, blip.crop) == ("squash", (224, 224), None)


def test_bad_files_name_themselves(tmp_path):
    with pytest.raises(ValueError, match=r"x\.json: image_processor_type 'SiglipImageProcessor' is not one"):
        from_hf({"image_processor_type": "SiglipImageProcessor"}, "x.json")
    with pytest.raises(ValueError, match="x.json: do_pad pads a batch"):
        from_hf({"image_processor_type": "CLIPImageProcessor", "do_pad": True}, "x.json")
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json"):
        read_processor(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="preprocessor_config.json: expected a JSON object"):
        read_processor(str(tmp_path))


def test_processor_config_json_wins_when_it_nests_one(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "BlipImageProcessor"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaProcessor"}))
    assert read_processor(str(tmp_path))[0].resize == "squash"
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_processor_type": "LlavaImageProcessor", "do_pad": True}}))
    processor, file = read_processor(str(tmp_path))
    assert processor.pad_square and file.endswith("/processor_config.json")


def test_resolve(tmp_path):
    config = get_config()
    config.data.tile_size = 28
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
         "crop_size": {"height": 28, "width": 28}}))
    assert resolve(config)[0] == from_config(config.data)  # no init_params: the keys
    config.init_params = str(ckpt)
    processor, where = resolve(config)
    assert processor.resize == "shortest_edge" and where.endswith("tokenizer/preprocessor_config.json")
    config.data.image_processor = "config"
    assert resolve(config)[0] == from_config(config.data)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config.init_params, config.data.image_processor = f"{workdir}@4", "auto"
    assert resolve(config)[0] == from_config(config.data)  # a workdir that recorded none
    (workdir / "preprocessor_config.json").write_text(json.dumps(processor.to_hf()))
    assert resolve(config)[0] == processor
    config.data.image_processor = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data.image_processor"):
        resolve(config)


def test_rgb_conversion_with_and_without_compositing(tmp_path):
    """A palette PNG with a transparent index loads (PIL's RGB conversion) as RGB that keeps the transparent colour:
    transformers' processors composite it onto white, the config keys keep the pixels as the released training
    code (and vlm_jax before processors) saw them."""
    img = _noise(40, 30, "P")
    img.save(tmp_path / "p.png")
    loaded = load_image(str(tmp_path / "p.png"))
    assert loaded.mode == "RGB" and loaded.info.get("transparency") is not None
    hf = BlipImageProcessorPil(size={"height": 32, "width": 32})
    np.testing.assert_array_equal(from_hf(hf.to_dict()).apply(loaded), _reference(hf, loaded))
    config = get_config()
    config.data.tile_size = 32
    plain = from_config(config.data).apply(loaded)
    np.testing.assert_array_equal(plain, normalize(loaded.resize((32, 32), Image.Resampling.BICUBIC)))
    assert not np.array_equal(plain, _reference(hf, loaded))


def test_a_run_from_an_import_trains_and_evaluates_with_its_processor(tmp_path, caplog):
    """init_params at an imported checkpoint directory whose source had a LlavaImageProcessor(do_pad=True)
    (`convert.py import` copies it into tokenizer/): the run's training and evaluation tiles are that processor's,
    its report says so and records it in the workdir, and a run (or an evaluation) from that workdir takes it from
    there. (tests/test_stage_configs.py sees the train command write the record.)"""
    write_dataset(tmp_path)
    hf = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    hf.save_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
    processor = from_hf(hf.to_dict())
    config = tiny_config("data.source=llava_json", f"data.path={tmp_path}", f"data.eval_path={tmp_path}",
                         "data.max_tiles=1", f"init_params={tmp_path / 'ckpt'}")
    images = [load_image(str(tmp_path / "imgs" / n)) for n in ("a.png", "b.png")]
    want = [processor.apply(img) for img in images]
    assert not np.array_equal(want[0], global_view(images[0], 32))  # the pad shows on the 64 x 40 image

    examples = make_eval_examples(config, TOKENIZER, 2)
    for ex, tiles in zip(examples, want):
        np.testing.assert_array_equal(ex["tiles"], tiles[None])
    batch = first_batch(config, TOKENIZER)
    seen = batch["tiles"][batch["tile_mask"]]
    assert len(seen) and all(any(np.array_equal(t, w) for w in want) for t in seen)

    (tmp_path / "run").mkdir()
    with caplog.at_level("INFO"):
        report_image_processor(config, str(tmp_path / "run"))
    assert f"from {tmp_path}/ckpt/tokenizer/preprocessor_config.json" in caplog.text, caplog.text
    assert "pad to square with (122, 116, 104), shortest edge to 32, centre crop 32x32" in caplog.text
    later = tiny_config("data.max_tiles=1", f"init_params={tmp_path / 'run'}@1")
    assert resolve(later) == (processor, str(tmp_path / "run" / "preprocessor_config.json"))
    with pytest.raises(ValueError, match="data.max_tiles=4 tiles images XVERSE-V's way"):
        tile_processor(tiny_config(f"init_params={tmp_path / 'run'}"))
    with pytest.raises(ValueError, match=r"makes \(32, 32\) images, not data.tile_size 64"):
        tile_processor(tiny_config("data.max_tiles=1", "data.tile_size=64", f"init_params={tmp_path / 'run'}"))
