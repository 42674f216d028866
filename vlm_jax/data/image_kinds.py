"""The data half of each image-input kind (tiles | packed patches): its batch keys, the row layout the packer
fills, record -> example and the eval prompt form, padding prompts into a generation batch, and what its rows
cost the tower. `kind_name` is where the config picks the kind; vlm_jax/image_inputs/ adds each kind's model
half (dummy inputs, encoder call, scatter) and is what the rest of the library asks. Kept free of jax, as all
data code, so that preprocessing never loads the model."""

import json
import logging
import math
import os

import ml_collections
import numpy as np

from vlm_jax.data.image_processor import PREPROCESSOR_FILE, ImageProcessor, resolve
from vlm_jax.data.images import tile_image, view_count
from vlm_jax.data.navit import example_mrope_positions, navit_grid, navit_patches, pack_patches
from vlm_jax.data.packing import Example, NavitExample, NavitRows, TiledRows, check_fits, tokens_per_tile
from vlm_jax.data.records import make_encoder, record_images
from vlm_jax.errors import InputError
from vlm_jax.files import replace_file

# model.vision.stem -> the image-input kind its tower takes (vlm_jax/vision/vit.py STEMS).
STEM_KINDS = {"clip": "tiles", "eva": "tiles", "qwenvl": "tiles", "navit": "patches"}


def kind_name(model: ml_collections.ConfigDict) -> str:
    """The name of the image-input kind of `model` (config.model)."""
    stem = model.vision.stem
    if stem not in STEM_KINDS:
        raise ValueError(f"model.vision.stem {stem!r} has no image-input kind; choose from {sorted(STEM_KINDS)}")
    return STEM_KINDS[stem]


def patch_dim(vision: ml_collections.ConfigDict) -> int:
    """Values of one flattened patch: (C=3, temporal_patch_size, patch_size, patch_size)."""
    return 3 * vision.temporal_patch_size * vision.patch_size ** 2


class DataKind:
    """The data half of one image-input kind for model config `model` (config.model)."""

    name: str  # the kind's name (STEM_KINDS values)
    keys: tuple[str, ...]  # the batch keys of its images, in the order `images` dicts list them
    has_grids: bool = False  # whether its images carry patch grids (what an M-RoPE decoder's ids come from)

    def __init__(self, model: ml_collections.ConfigDict):
        self.model = model

    def mrope(self) -> bool:
        """Whether the decoder takes M-RoPE positions [B, L, 3] (Qwen2-VL) rather than 1-D ones; refused for a
        kind whose images have no grids to take the ids from."""
        mrope = self.model.text.rope_kind == "mrope"
        if mrope and not self.has_grids:
            raise ValueError(f"an M-RoPE decoder takes its positions from NaViT image grids, which {self.name} "
                             f"image inputs (model.vision.stem={self.model.vision.stem!r}) do not have")
        return mrope

    def select(self, batch: dict) -> dict:
        """The kind's images out of a flat batch dict (docs/contracts.md)."""
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ValueError(f"batch has no {missing} for {self.name} image inputs (it holds {sorted(batch)})")
        return {k: batch[k] for k in self.keys}

    def row_layout(self, config: ml_collections.ConfigDict, grouped: bool = True) -> TiledRows | NavitRows:
        """The packer's fixed row shape of `config` (data/packing.py), `positions` [rows, L, 3] for an M-RoPE
        decoder; rows in groups of data.vision_group_rows unless not `grouped`."""
        return self._rows(config, config.data.vision_group_rows, grouped)

    def _rows(self, config: ml_collections.ConfigDict, group: int, grouped: bool) -> TiledRows | NavitRows:
        raise NotImplementedError

    def record_to_example(self, config: ml_collections.ConfigDict, tokenizer):
        """record -> packing example, picklable for grain workers. It also gives the eval prompt form:
        images(record), run_lengths(images), prompt_fields(images) and, with has_grids, mrope_positions."""
        raise NotImplementedError

    def segments_per_row(self, data: ml_collections.ConfigDict) -> int:
        """Most attention segments a row of its vision sequences holds (0: every image attends on its own)."""
        raise NotImplementedError

    def vision_tokens(self, config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
        """((tokens the tower sees per step, the sequence length its attention sees, number of such sequences),
        visual tokens the connector emits per step) for a batch of `config` (train/flops.py's FLOP count)."""
        raise NotImplementedError

    def _prompt_example(self, ex: dict) -> Example | NavitExample:
        """An eval example (make_eval_examples) as a packing example without loss or starts, for check_fits."""
        raise NotImplementedError

    def _write_prompt_images(self, batch: dict, row: int, ex: dict, layout) -> None:
        raise NotImplementedError

    def prompt_problem(self, ex: dict, layout) -> str | None:
        """Why eval example `ex` (make_eval_examples) can never fit a generation row of `layout`, or None."""
        return check_fits(self._prompt_example(ex), layout)

    def pad_prompts(self, examples: list[dict], config: ml_collections.ConfigDict, rows: int) -> dict:
        """Right-pads eval examples (data/pipeline.py make_eval_examples) into one fixed-shape generation batch of
        `rows` rows, one example per row, never grouped; `positions` [rows, L, 3] for an M-RoPE decoder."""
        layout = self.row_layout(config, grouped=False)
        batch = layout.empty(rows)
        for row, ex in enumerate(examples):
            problem = self.prompt_problem(ex, layout)
            if problem:
                raise InputError(f"eval example {ex['id']}: {problem}")
            n = len(ex["tokens"])
            batch["tokens"][row, :n] = ex["tokens"]
            batch["positions"][row, :n] = ex["positions"]
            batch["segment_ids"][row, :n] = 1
            self._write_prompt_images(batch, row, ex, layout)
        return batch


def tile_processor(config: ml_collections.ConfigDict) -> ImageProcessor:
    """The image processor of a tiled run (image_processor.resolve), checked against data.tile_size and, with
    XVERSE-V's tiles (data.max_tiles > 1), that it squashes: the tiles are squash resizes of the same image."""
    d = config.data
    processor, source = resolve(config)
    if processor.output_size() != (d.tile_size, d.tile_size):
        raise ValueError(f"the image processor from {source} makes {processor.output_size() or 'variable-size'} "
                         f"images, not data.tile_size {d.tile_size} squares")
    if d.max_tiles > 1 and (processor.resize != "squash" or processor.pad_square):
        raise ValueError(f"data.max_tiles={d.max_tiles} tiles images XVERSE-V's way, by squash resizes; the image "
                         f"processor from {source} does not squash ({processor.describe()})")
    return processor


class RecordToExample:
    """Record -> (tiles, encoded conversation); picklable so grain can run it in workers."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        d = config.data
        self.encoder = make_encoder(config, tokenizer)
        self.tile_size, self.max_tiles, self.swap_hw = d.tile_size, d.max_tiles, d.swap_hw
        self.p = tokens_per_tile(config.model, d.tile_size)
        self.processor = tile_processor(config)

    def images(self, record: dict) -> list[np.ndarray]:
        """The record's images, each as its views [k, S, S, 3] (XVERSE-V tiling per image)."""
        return [tile_image(image, self.tile_size, self.max_tiles, self.swap_hw, self.processor)
                for image in record_images(record)]

    def run_lengths(self, views: list[np.ndarray]) -> list[int]:
        """Each image's placeholder run: P per view."""
        return [len(v) * self.p for v in views]

    def tile_starts(self, image_starts, views: list[np.ndarray]) -> np.ndarray:
        starts = [s + np.arange(len(v)) * self.p for s, v in zip(image_starts, views)]
        return np.concatenate(starts).astype(np.int32) if starts else np.zeros((0,), np.int32)

    def stack(self, views: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(views) if views else np.zeros((0, self.tile_size, self.tile_size, 3), np.float32)

    def prompt_fields(self, views: list[np.ndarray]) -> dict:
        """An eval example's images: tiles float32 [k, S, S, 3] (k = 0 for text-only)."""
        return dict(tiles=self.stack(views))

    def __call__(self, record: dict) -> Example:
        return self._example(record, self.images(record))

    def footprint(self, header: dict) -> Example:
        """The Example of a record given by its `header` (a source's: each image as its (width, height)), without
        pixels: tokens, loss and starts as __call__ gives them, views [k, 0, 0, 3] per image (data/epochs.py counts
        on it)."""
        views = [np.zeros((view_count(*size, self.tile_size, self.max_tiles), 0, 0, 3), np.float32)
                 for size in header["images"]]
        return self._example(header, views)

    def _example(self, record: dict, views: list[np.ndarray]) -> Example:
        enc = self.encoder.encode(record["conversations"], self.run_lengths(views), record["id"])
        return Example(record["id"], enc.tokens, enc.loss, self.stack(views), self.tile_starts(enc.image_starts, views))


class TileData(DataKind):
    """Batch keys tiles [B, T, S, S, 3], tile_mask [B, T], image_dest [B, T*P] (docs/contracts.md)."""

    name = "tiles"
    keys = ("tiles", "tile_mask", "image_dest")

    def _rows(self, config: ml_collections.ConfigDict, group: int, grouped: bool) -> TiledRows:
        d = config.data
        self.mrope()  # refuses an M-RoPE decoder: tiles have no grids to take its ids from
        if group != 1:
            raise ValueError(f"data.vision_group_rows={group} groups NaViT rows; tiled rows (model.vision.stem="
                             f"{config.model.vision.stem!r}) take 1")
        return TiledRows(d.seq_len, d.max_tiles_per_row, d.tile_size, tokens_per_tile(self.model, d.tile_size),
                         d.max_examples_per_row)

    def record_to_example(self, config: ml_collections.ConfigDict, tokenizer) -> RecordToExample:
        return RecordToExample(config, tokenizer)

    def segments_per_row(self, data: ml_collections.ConfigDict) -> int:
        return 0

    def vision_tokens(self, config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
        d, v = config.data, self.model.vision
        per_tile = (v.image_size // v.patch_size) ** 2 + (1 if v.stem in ("clip", "eva") else 0)
        tiles = config.batch_size * d.max_tiles_per_row
        return (tiles * per_tile, per_tile, tiles), tiles * tokens_per_tile(self.model, d.tile_size)

    def _prompt_example(self, ex: dict) -> Example:
        return Example(ex["id"], ex["tokens"], None, ex["tiles"], None)

    def _write_prompt_images(self, batch: dict, row: int, ex: dict, layout: TiledRows) -> None:
        k = len(ex["tiles"])
        batch["tiles"][row, :k] = ex["tiles"]
        batch["tile_mask"][row, :k] = True
        batch["image_dest"][row, :len(ex["image_positions"])] = ex["image_positions"]


class RecordToNavitExample:
    """Record -> (native-resolution patches per image, encoded conversation); picklable so grain can run it in
    workers. Each image's placeholder run is one token per merge window (t*h*w / merge_size**2)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        d, v = config.data, config.model.vision
        self.encoder = make_encoder(config, tokenizer)
        self.merge = config.model.connector.merge_size
        self.grid_args = dict(patch_size=v.patch_size, merge_size=self.merge, min_pixels=d.min_pixels,
                              max_pixels=d.max_pixels)
        self.patch_args = dict(self.grid_args, temporal_patch_size=v.temporal_patch_size)

    def images(self, record: dict) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """The record's images, each as (patches, grid) (`navit.navit_patches`)."""
        return [navit_patches(image, **self.patch_args) for image in record_images(record)]

    def run_lengths(self, images: list) -> list[int]:
        return [math.prod(grid) // self.merge ** 2 for _, grid in images]

    def prompt_fields(self, images: list) -> dict:
        """An eval example's images: images, a list of (patches, grid) per image."""
        return dict(images=images)

    def mrope_positions(self, length: int, image_starts, images: list) -> np.ndarray:
        """M-RoPE ids [length, 3] of an example whose image i's run starts at image_starts[i]."""
        return example_mrope_positions(length, image_starts, [grid for _, grid in images], self.merge)

    def __call__(self, record: dict) -> NavitExample:
        return self._example(record, self.images(record))

    def footprint(self, header: dict) -> NavitExample:
        """The NavitExample of a record given by its `header` (a source's: each image as its (width, height)),
        without pixels: tokens, loss, starts and grids as __call__ gives them, patches [t*h*w, 0] per image
        (data/epochs.py counts on it)."""
        grids = [navit_grid(*size, **self.grid_args) for size in header["images"]]
        return self._example(header, [(np.zeros((math.prod(grid), 0), np.float32), grid) for grid in grids])

    def _example(self, record: dict, images: list) -> NavitExample:
        enc = self.encoder.encode(record["conversations"], self.run_lengths(images), record["id"])
        return NavitExample(record["id"], enc.tokens, enc.loss, tuple(images), np.asarray(enc.image_starts, np.int32))


class PatchData(DataKind):
    """Batch keys patches [B, N, D], patch_positions [B, N, 2], patch_segment_ids [B, N], image_dest [B, N/m**2]
    ([B/g, g*N/m**2] for groups of g rows sharing their vision rows; docs/contracts.md)."""

    name = "patches"
    keys = ("patches", "patch_positions", "patch_segment_ids", "image_dest")
    has_grids = True

    def _rows(self, config: ml_collections.ConfigDict, group: int, grouped: bool) -> NavitRows:
        d = config.data
        return NavitRows(d.seq_len, d.max_patches_per_row, d.max_images_per_row, patch_dim(self.model.vision),
                         self.model.connector.merge_size, d.max_examples_per_row, self.mrope(),
                         group if grouped else 1)

    def record_to_example(self, config: ml_collections.ConfigDict, tokenizer) -> RecordToNavitExample:
        return RecordToNavitExample(config, tokenizer)

    def segments_per_row(self, data: ml_collections.ConfigDict) -> int:
        return data.max_images_per_row

    def vision_tokens(self, config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
        rows, n = config.batch_size, config.data.max_patches_per_row
        return (rows * n, n, rows), rows * n // self.model.connector.merge_size ** 2

    def _prompt_example(self, ex: dict) -> NavitExample:
        return NavitExample(ex["id"], ex["tokens"], None, tuple(ex["images"]), None)

    def _write_prompt_images(self, batch: dict, row: int, ex: dict, layout: NavitRows) -> None:
        for key, value in pack_patches(ex["images"], layout.max_patches, layout.patch_dim, layout.merge).items():
            batch[key][row] = value
        batch["image_dest"][row, :len(ex["image_positions"])] = ex["image_positions"]


DATA_KINDS: dict[str, type[DataKind]] = {k.name: k for k in (TileData, PatchData)}


def data_kind(model: ml_collections.ConfigDict) -> DataKind:
    """The data half of `model`'s image-input kind, for data code that must not load the model
    (vlm_jax/image_inputs/ `make` gives the whole kind)."""
    return DATA_KINDS[kind_name(model)](model)


def report_image_processor(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Logs the image processor a tiled run uses and where it came from; with `workdir`, also writes it there as
    preprocessor_config.json, where a run starting from this one finds it (image_processor.recorded_folder)."""
    if data_kind(config.model).name != TileData.name:
        return
    processor, source = resolve(config)
    logging.info("image processor: %s; from %s", processor.describe(), source)
    if workdir:
        replace_file(os.path.join(workdir, PREPROCESSOR_FILE), lambda f: json.dump(processor.to_hf(), f, indent=2))
