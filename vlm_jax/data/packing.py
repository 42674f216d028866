"""Greedy, deterministic packing of examples into fixed-shape rows (docs/contracts.md batch)."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example.

    tokens: int32 [n] (placeholder id at visual-token slots); loss: bool [n], True on tokens that are
    prediction targets (assistant answer + end token); tiles: float32 [k, S, S, 3] normalised views
    of all its images in order; tile_starts: int32 [k], where tile t's run of P visual tokens starts
    in tokens.
    """

    id: str
    tokens: np.ndarray
    loss: np.ndarray
    tiles: np.ndarray
    tile_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def tokens_per_tile(model, tile_size: int) -> int:
    """Placeholder slots per tile = visual tokens the model writes for one tile (`model` = config.model).

    A connector with a fixed query count (`connector.num_queries`: Q-Former, resampler) emits that many per
    tile whatever the patch grid; otherwise every ViT output token passes through, one per patch plus the
    class token when the ViT keeps it.
    """
    v = model.vision
    if tile_size % v.patch_size:
        raise ValueError(f"data.tile_size {tile_size} is not a multiple of model.vision.patch_size {v.patch_size}")
    queries = model.connector.get("num_queries", 0)
    if queries:
        return queries
    return (tile_size // v.patch_size) ** 2 + (0 if v.drop_cls else 1)


def check_fits(ex: Example, seq_len: int, max_tiles_per_row: int) -> str | None:
    """Why this example can never fit in a row, or None if it can."""
    if len(ex) > seq_len:
        return f"example {ex.id}: {len(ex)} tokens exceed data.seq_len {seq_len}"
    if len(ex.tiles) > max_tiles_per_row:
        return f"example {ex.id}: {len(ex.tiles)} tiles exceed data.max_tiles_per_row {max_tiles_per_row}"
    return None


def empty_batch(rows: int, seq_len: int, max_tiles: int, tile_size: int, tokens_per_tile: int) -> dict:
    return dict(
        tokens=np.zeros((rows, seq_len), np.int32),
        targets=np.zeros((rows, seq_len), np.int32),
        loss_mask=np.zeros((rows, seq_len), np.float32),
        positions=np.zeros((rows, seq_len), np.int32),
        segment_ids=np.zeros((rows, seq_len), np.int32),
        tiles=np.zeros((rows, max_tiles, tile_size, tile_size, 3), np.float32),
        tile_mask=np.zeros((rows, max_tiles), bool),
        # Padded tile slots point one past the end, so the model's scatter drops them.
        image_dest=np.full((rows, max_tiles * tokens_per_tile), seq_len, np.int32),
    )


def write_row(batch: dict, row: int, examples: list[Example], tokens_per_tile: int) -> None:
    """Writes examples (already known to fit) side by side into batch row `row`."""
    offset, slot = 0, 0
    p = tokens_per_tile
    for seg, ex in enumerate(examples, start=1):
        n, k = len(ex), len(ex.tiles)
        end = offset + n
        batch["tokens"][row, offset:end] = ex.tokens
        # Targets stay inside the example: its last token predicts nothing.
        batch["targets"][row, offset:end - 1] = ex.tokens[1:]
        batch["loss_mask"][row, offset:end - 1] = ex.loss[1:]
        batch["positions"][row, offset:end] = np.arange(n)
        batch["segment_ids"][row, offset:end] = seg
        if k:
            batch["tiles"][row, slot:slot + k] = ex.tiles
            batch["tile_mask"][row, slot:slot + k] = True
            dest = offset + ex.tile_starts[:, None] + np.arange(p)[None, :]
            batch["image_dest"][row, slot * p:(slot + k) * p] = dest.reshape(-1)
        offset, slot = end, slot + k
