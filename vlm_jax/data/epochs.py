"""A run's length in epochs (data.epochs N > 0): the rows the packer makes of N passes over the training data,
counted before training, and the optimizer steps they take.

The count runs the packer itself (data/pipeline.py PackedBatchIterator: greedy rows, pack_window's planned rows,
vision groups, skip_too_long, on_bad_record) over each example's footprint: its tokens and the views or patch grid
its image makes, from the record's text and the image's size (a source's `header`: a file header, or a synthetic
scene's size), never its pixels. A record the header already shows bad (its structure or text, an image missing,
unreadable or over data.max_image_pixels) is skipped or raised as training does; one whose image fails only when its
pixels are decoded (a truncated file) is counted here and left out in training, whose epoch then packs a row or so
fewer than counted: the last steps hold some empty rows, which add nothing to the loss (it is normalised by the
tokens the batch holds). With epochs the packer closes every row, window and group at an epoch's end, so each
epoch of each data shard packs on its own into the rows counted here; grain reshuffles every epoch, so each is
counted. The count is a pure function of the config and the data, the same on every process and on every restart.
"""

import math
import os

import ml_collections

from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.pipeline import (PackedBatchIterator, ReadExample, epoch_bounds, make_source, row_layout,
                                   shard_rows, shard_stream)


def count_epochs(config: ml_collections.ConfigDict, tokenizer, shards: list[int]) -> dict[int, list[int]]:
    """data shard -> how many units (rows; groups of data.vision_group_rows rows for grouped NaViT rows) each of
    its data.epochs epochs packs into, for the data shards `shards`."""
    d = config.data
    if config.total_steps:
        raise ValueError(f"data.epochs={d.epochs} counts the run's steps, but total_steps={config.total_steps} is set "
                         "too: set total_steps=0, or data.epochs=0 for a run of total_steps")
    skip_bad = d.on_bad_record == "skip"
    source = make_source(config, "train", keep_bad=skip_bad)
    footprint = data_kind(config.model).record_to_example(config, tokenizer).footprint
    layout, rows, threads = row_layout(config), shard_rows(config), os.cpu_count() or 1
    counts = {}
    for s in shards:
        stream = shard_stream(config, len(source), s, d.shards).map(ReadExample(source, footprint, headers=True))
        epoch_size, stop = epoch_bounds(config, len(stream))
        # Nothing else runs yet: every core encodes (the tokenizer releases the GIL).
        packer = PackedBatchIterator(stream, rows=rows, layout=layout, window=d.pack_window,
                                     skip_too_long=d.skip_too_long, skip_bad=skip_bad,
                                     max_bad_fraction=d.max_bad_fraction, threads=threads, lookahead=4 * threads,
                                     epoch_size=epoch_size, stop=stop)
        counts[s], skipped = [], (0, 0)
        for e in range(d.epochs):
            units, skipped = packer.count_units(e * epoch_size, (e + 1) * epoch_size, skipped)
            counts[s].append(units)
    return counts


def epoch_steps(config: ml_collections.ConfigDict, counts: dict[int, list[int]]) -> int:
    """Optimizer steps of data.epochs epochs whose units every data shard counted (`count_epochs` of all shards):
    each shard packs its share of a batch from its rows of all epochs in turn, so the run is as long as the
    longest shard's rows take; shards that run out earlier fill their rows of the last steps with padding."""
    d, group = config.data, row_layout(config).group
    missing = sorted(set(range(d.shards)) - set(counts))
    if missing:
        raise ValueError(f"data.epochs: no count of data shards {missing} of data.shards={d.shards}")
    for e in range(d.epochs):
        rows = group * sum(c[e] for c in counts.values())
        if rows < config.batch_size:
            raise ValueError(f"data.epochs={d.epochs}: epoch {e + 1} of the training data packs into {rows} rows, "
                             f"fewer than one batch of batch_size={config.batch_size}")
    per_step = shard_rows(config) // group
    return max(math.ceil(sum(c) / per_step) for c in counts.values())
