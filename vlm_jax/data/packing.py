"""Greedy, deterministic packing of examples into fixed-shape rows (docs/contracts.md batch).

Two row layouts share the text side (tokens, targets, loss mask, positions and segment ids restarting per
example; NaViT rows for an M-RoPE decoder hold each example's [n, 3] ids) and differ in how a row holds its
images: `TiledRows` (tiles of a static size, `max_tiles_per_row` slots) and `NavitRows` (native-resolution
patches of every image back to back, `max_patches_per_row` slots, at most `max_images_per_row` images). Every
row holds at most `max_examples_per_row` examples (a static segment count, which the cudnn attention backend
sizes its packed layout by). Each layout says what an example costs against the row's static budgets, so one
greedy packer (vlm_jax/data/pipeline.py) fills rows of either kind.
"""

import dataclasses
import math

import numpy as np

from vlm_jax.data.navit import example_mrope_positions, pack_patches


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example.

    tokens: int32 [n] (placeholder id at visual-token slots); loss: bool [n], True on tokens that are
    prediction targets (assistant answer + end token); tiles: float32 [k, S, S, 3] normalised views
    of all its images in order; tile_starts: int32 [k], where tile t's run of P visual tokens starts
    in tokens; source: the index of its training source in data.mixture (0 without one), written to the batch's
    source_ids.
    """

    id: str
    tokens: np.ndarray
    loss: np.ndarray
    tiles: np.ndarray
    tile_starts: np.ndarray
    source: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class NavitExample:
    """One tokenised example with native-resolution images (the NaViT batch of docs/contracts.md).

    tokens, loss: as `Example`; images: (patches float32 [t*h*w, D], grid (t, h, w)) per image in order
    (`navit.navit_patches`); image_starts: int32 [k], where image i's run of t*h*w / merge**2 placeholders
    starts in tokens; source: as `Example`.
    """

    id: str
    tokens: np.ndarray
    loss: np.ndarray
    images: tuple[tuple[np.ndarray, tuple[int, int, int]], ...]
    image_starts: np.ndarray
    source: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_patches(self) -> int:
        return sum(math.prod(grid) for _, grid in self.images)


def tokens_per_tile(model, tile_size: int) -> int:
    """Placeholder slots per tile = visual tokens the model writes for one tile (`model` = config.model).

    A connector with a fixed query count (`connector.num_queries`: Q-Former, resampler) emits that many per
    tile whatever the patch grid; a merging connector (`connector.merge_size` m) one per m x m patch window;
    otherwise every ViT output token passes through, one per patch plus the class token when the ViT keeps it.
    """
    v = model.vision
    if tile_size % v.patch_size:
        raise ValueError(f"data.tile_size {tile_size} is not a multiple of model.vision.patch_size {v.patch_size}")
    queries = model.connector.num_queries
    if queries:
        return queries
    merge = model.connector.merge_size
    grid = tile_size // v.patch_size
    if merge > 1 and (grid % merge or not v.drop_cls):
        raise ValueError(f"connector.merge_size {merge} on tiles needs vision.drop_cls and a patch grid "
                         f"({grid} = data.tile_size / patch_size) divisible by it")
    return grid * grid // merge ** 2 + (0 if v.drop_cls else 1)


def text_batch(rows: int, seq_len: int, mrope: bool = False) -> dict:
    """The zeroed text arrays of a batch; `positions` [rows, seq_len, 3] with `mrope`."""
    return dict(
        tokens=np.zeros((rows, seq_len), np.int32),
        targets=np.zeros((rows, seq_len), np.int32),
        loss_mask=np.zeros((rows, seq_len), np.float32),
        positions=np.zeros((rows, seq_len, 3) if mrope else (rows, seq_len), np.int32),
        segment_ids=np.zeros((rows, seq_len), np.int32),
        source_ids=np.zeros((rows, seq_len), np.int32),
    )


def write_text(batch: dict, row: int, examples: list, positions: list[np.ndarray] | None = None) -> list[int]:
    """Writes the examples' text side by side into row `row`; returns where each one starts.

    `positions` holds each example's RoPE ids ([n], or M-RoPE [n, 3]); without it they are 0, 1, 2, ... each."""
    offsets, offset = [], 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex)
        end = offset + n
        batch["tokens"][row, offset:end] = ex.tokens
        # Targets stay inside the example: its last token predicts nothing.
        batch["targets"][row, offset:end - 1] = ex.tokens[1:]
        batch["loss_mask"][row, offset:end - 1] = ex.loss[1:]
        batch["positions"][row, offset:end] = np.arange(n) if positions is None else positions[seg - 1]
        batch["segment_ids"][row, offset:end] = seg
        batch["source_ids"][row, offset:end] = ex.source
        offsets.append(offset)
        offset = end
    return offsets


class TiledRows:
    """Rows of the tiled batch: `max_tiles_per_row` tile slots of P placeholder tokens each."""

    group = 1  # every row holds its own tiles (NavitRows.group)

    def __init__(self, seq_len: int, max_tiles_per_row: int, tile_size: int, tokens_per_tile: int,
                 max_examples_per_row: int):
        self.seq_len, self.max_tiles, self.tile_size, self.p = seq_len, max_tiles_per_row, tile_size, tokens_per_tile
        self.budgets = (("tokens", "data.seq_len", seq_len), ("tiles", "data.max_tiles_per_row", max_tiles_per_row),
                        ("examples", "data.max_examples_per_row", max_examples_per_row))

    def cost(self, ex: Example) -> tuple[int, ...]:
        return len(ex), len(ex.tiles), 1

    def empty(self, rows: int) -> dict:
        return empty_batch(rows, self.seq_len, self.max_tiles, self.tile_size, self.p)

    def write(self, batch: dict, row: int, examples: list[Example]) -> None:
        write_row(batch, row, examples, self.p)


class NavitRows:
    """Rows of the NaViT batch: `max_patches_per_row` patch slots (a multiple of merge_size**2) holding at most
    `max_images_per_row` images. With `mrope` (a Qwen2-VL decoder) `positions` is [rows, L, 3]: each example's
    M-RoPE ids, from 0 as if it were alone (`navit.example_mrope_positions`).

    With `group` g > 1 every g consecutive rows form a group whose g vision rows hold the images of all its
    examples, wherever their text sits (plan_groups); `image_dest` is then [rows / g, g * N / m**2]: merge window
    j of the group's vision rows (flat) goes to flat position row * L + position of the group's text rows, and
    g * L means dropped. With g = 1 that is the per-row layout."""

    def __init__(self, seq_len: int, max_patches_per_row: int, max_images_per_row: int, patch_dim: int,
                 merge_size: int, max_examples_per_row: int, mrope: bool = False, group: int = 1):
        window = merge_size ** 2
        if max_patches_per_row % window:
            raise ValueError(f"data.max_patches_per_row {max_patches_per_row} is not a multiple of {window} "
                             f"(one {merge_size}x{merge_size} merge window)")
        if group < 1:
            raise ValueError(f"data.vision_group_rows must be at least 1, not {group}")
        self.seq_len, self.max_patches, self.patch_dim, self.merge = seq_len, max_patches_per_row, patch_dim, merge_size
        self.mrope, self.group = mrope, group
        self.budgets = (("tokens", "data.seq_len", seq_len),
                        ("patches", "data.max_patches_per_row", max_patches_per_row),
                        ("images", "data.max_images_per_row", max_images_per_row),
                        ("examples", "data.max_examples_per_row", max_examples_per_row))

    def cost(self, ex: NavitExample) -> tuple[int, ...]:
        return len(ex), ex.num_patches, len(ex.images), 1

    def empty(self, rows: int) -> dict:
        if rows % self.group:
            raise ValueError(f"{rows} rows do not split into groups of data.vision_group_rows={self.group}")
        n, g = self.max_patches, self.group
        return dict(text_batch(rows, self.seq_len, self.mrope),
                    patches=np.zeros((rows, n, self.patch_dim), np.float32),
                    patch_positions=np.zeros((rows, n, 2), np.int32),
                    patch_segment_ids=np.zeros((rows, n), np.int32),
                    # Padding windows point one past the end, so the model's scatter drops them.
                    image_dest=np.full((rows // g, g * n // self.merge ** 2), g * self.seq_len, np.int32))

    def write(self, batch: dict, row: int, examples: list[NavitExample]) -> None:
        """Writes examples (already known to fit) side by side into row `row`, their images into its vision row."""
        if self.group != 1:
            raise ValueError(f"rows of data.vision_group_rows={self.group} are written a group at a time")
        self.write_group(batch, row, examples, PlannedGroup(
            [list(range(len(examples)))], [[(i, j) for i, ex in enumerate(examples) for j in range(len(ex.images))]]))

    def write_group(self, batch: dict, group: int, examples: list[NavitExample], plan: "PlannedGroup") -> None:
        """Writes group `group` (rows group*g ... group*g + g - 1) as `plan` lays out `examples` (indices of the
        plan point into it)."""
        g, m2 = self.group, self.merge ** 2
        where = {}  # example -> flat position of its first token among the group's text rows
        for r, members in enumerate(plan.rows):
            exs = [examples[i] for i in members]
            positions = [example_mrope_positions(len(ex), ex.image_starts, [grid for _, grid in ex.images],
                                                 self.merge) for ex in exs] if self.mrope else None
            offsets = write_text(batch, group * g + r, exs, positions)
            where.update({i: r * self.seq_len + offset for i, offset in zip(members, offsets)})
        per_row = self.max_patches // m2
        for v, members in enumerate(plan.vision):
            packed = pack_patches([examples[i].images[j] for i, j in members], self.max_patches, self.patch_dim,
                                  self.merge)
            for key, value in packed.items():
                batch[key][group * g + v] = value
            dest = [where[i] + examples[i].image_starts[j] + np.arange(math.prod(examples[i].images[j][1]) // m2)
                    for i, j in members]
            if dest:
                dest = np.concatenate(dest)
                batch["image_dest"][group, v * per_row:v * per_row + len(dest)] = dest


def check_fits(ex, layout: "TiledRows | NavitRows") -> str | None:
    """Why this example can never fit in a row of `layout` (the caller names the example), or None if it can."""
    for cost, (unit, key, limit) in zip(layout.cost(ex), layout.budgets):
        if cost > limit:
            return f"{cost} {unit} exceed {key} {limit}"
    return None


def empty_batch(rows: int, seq_len: int, max_tiles: int, tile_size: int, tokens_per_tile: int) -> dict:
    return dict(
        text_batch(rows, seq_len),
        tiles=np.zeros((rows, max_tiles, tile_size, tile_size, 3), np.float32),
        tile_mask=np.zeros((rows, max_tiles), bool),
        # Padded tile slots point one past the end, so the model's scatter drops them.
        image_dest=np.full((rows, max_tiles * tokens_per_tile), seq_len, np.int32),
    )


def write_row(batch: dict, row: int, examples: list[Example], tokens_per_tile: int) -> None:
    """Writes examples (already known to fit) side by side into batch row `row`."""
    slot, p = 0, tokens_per_tile
    for offset, ex in zip(write_text(batch, row, examples), examples):
        k = len(ex.tiles)
        if k:
            batch["tiles"][row, slot:slot + k] = ex.tiles
            batch["tile_mask"][row, slot:slot + k] = True
            dest = offset + ex.tile_starts[:, None] + np.arange(p)[None, :]
            batch["image_dest"][row, slot * p:(slot + k) * p] = dest.reshape(-1)
        slot += k


def plan_rows(costs: list[tuple[int, ...]], limits: tuple[int, ...]) -> list[list[int]]:
    """Best-fit decreasing over one window of examples: which examples (indices into `costs`) share each row.

    `costs[i]` is example i's use of every row budget (a layout's `cost`), `limits` the budgets; sizes and room
    are summed over the budgets, each relative to its limit. Largest first, each example goes to the open row
    it leaves least room in, or opens a row. Filling with the short examples the long ones left gaps for is what brings
    padding down to a few percent where stream-order packing wastes about half an example per row.
    Deterministic: equal costs keep stream order, so a window always plans the same rows.
    """
    limit = np.asarray(limits, np.float64)
    size = (np.asarray(costs, np.float64).reshape(len(costs), len(limits)) / limit).sum(axis=1)
    order = sorted(range(len(costs)), key=lambda i: (-size[i], i))
    rows: list[list[int]] = []
    room = np.zeros((0, len(limits)))  # what each open row has left
    for i in order:
        cost = np.asarray(costs[i], np.float64)
        after = room - cost
        slack = np.where((after >= 0).all(axis=1), (after / limit).sum(axis=1), np.inf)
        if len(rows) and np.isfinite(slack.min()):
            best = int(np.argmin(slack))
            rows[best].append(i)
            room[best] = after[best]
        else:
            rows.append([i])
            room = np.concatenate([room, (limit - cost)[None]])
    # Each row keeps its examples in stream order.
    return [sorted(r) for r in rows]


SNUG = 0.01  # plan_groups: a row left with less than this share of its room counts as closed


@dataclasses.dataclass
class PlannedGroup:
    """One group of a grouped NaViT batch (`NavitRows.group` rows): `rows[r]` the examples (window indices, in
    stream order) whose text fills row r; `vision[v]` the (example, image) pairs whose patches fill vision row v.
    An example's images may sit in any of the group's vision rows."""

    rows: list[list[int]]
    vision: list[list[tuple[int, int]]]


def plan_groups(tokens: list[int], images: list[list[int]], layout: "NavitRows", carried: int = 0,
                flush: bool = False) -> tuple[list[PlannedGroup], list[int]]:
    """Plans one window of examples (text length `tokens[i]`, patches of each image `images[i]`) into groups of
    `layout.group` text rows and as many vision rows; returns the groups and the examples left for the next window.

    Rows of one text and one vision budget each pull apart: a document fills the patch slots and leaves tokens
    empty. A group shares its vision rows among its text rows, so only the group's totals must match. The window
    opens as many groups as its totals fill (rounded down) and takes the examples largest first, each into the
    group where it closes the most rows (text or vision rows left under SNUG empty), then whose free room points
    most the way the example does (the dot product of the two as fractions), in its fullest rows that fit. What
    does not fit waits for the next window, as the first `carried` examples did for this one: those, and every
    example when `flush`, open a group rather than wait again. Deterministic.
    """
    g, seq, cap = layout.group, layout.seq_len, layout.max_patches
    per_row = dict(zip((key for _, key, _ in layout.budgets), (limit for _, _, limit in layout.budgets)))
    max_examples, max_images = per_row["data.max_examples_per_row"], per_row["data.max_images_per_row"]
    patches = [sum(p) for p in images]
    need = max(sum(tokens) / seq, sum(patches) / cap, len(tokens) / max_examples,
               sum(map(len, images)) / max_images) / g
    count = max(1, math.ceil(need) if flush else math.floor(need))
    text_room, text_count = np.full((count, g), seq), np.zeros((count, g), int)
    vision_room, vision_count = np.full((count, g), cap), np.zeros((count, g), int)
    groups = [PlannedGroup([[] for _ in range(g)], [[] for _ in range(g)]) for _ in range(count)]

    def place(k: int, i: int) -> bool:
        """Puts example i into group k's fullest rows that fit, if it fits."""
        rows = np.flatnonzero((text_room[k] >= tokens[i]) & (text_count[k] < max_examples))
        if not len(rows):
            return False
        room, used, spots = vision_room[k].copy(), vision_count[k].copy(), []
        for j in sorted(range(len(images[i])), key=lambda j: -images[i][j]):
            fits = np.flatnonzero((room >= images[i][j]) & (used < max_images))
            if not len(fits):
                return False
            v = fits[np.argmin(room[fits])]
            room[v] -= images[i][j]
            used[v] += 1
            spots.append((v, j))
        r = rows[np.argmin(text_room[k][rows])]
        text_room[k, r] -= tokens[i]
        text_count[k, r] += 1
        vision_room[k], vision_count[k] = room, used
        groups[k].rows[r].append(i)
        for v, j in spots:
            groups[k].vision[v].append((i, j))
        return True

    def size(i: int) -> float:
        return tokens[i] / seq + patches[i] / cap

    order = (sorted(range(carried), key=lambda i: (-size(i), i)) +
             sorted(range(carried, len(tokens)), key=lambda i: (-size(i), i)))
    left = []
    for i in order:
        free_text = text_room.sum(axis=1) / (g * seq)
        free_vision = vision_room.sum(axis=1) / (g * cap)
        score = tokens[i] / seq * free_text + patches[i] / cap * free_vision
        # Rows the example would all but close (under SNUG of the row left) rank first: the residue of rows is
        # what remains of the padding once the groups balance (bench/packing.py, docs/experiments.md 3).
        rest = text_room - tokens[i]
        closes = ((rest >= 0) & (rest < SNUG * seq) & (text_count < max_examples)).any(axis=1).astype(int)
        if images[i]:
            rest = vision_room - max(images[i])
            closes += ((rest >= 0) & (rest < SNUG * cap) & (vision_count < max_images)).any(axis=1)
        if any(place(k, i) for k in sorted(range(len(groups)), key=lambda k: (-closes[k], -score[k], k))):
            continue
        if i >= carried and not flush:
            left.append(i)
            continue
        groups.append(PlannedGroup([[] for _ in range(g)], [[] for _ in range(g)]))
        text_room = np.concatenate([text_room, np.full((1, g), seq)])
        text_count = np.concatenate([text_count, np.zeros((1, g), int)])
        vision_room = np.concatenate([vision_room, np.full((1, g), cap)])
        vision_count = np.concatenate([vision_count, np.zeros((1, g), int)])
        if not place(len(groups) - 1, i):
            raise ValueError(f"example {i} does not fit an empty group: check it with check_fits first")
    for group in groups:
        group.rows = [sorted(r) for r in group.rows]
        group.vision = [sorted(v) for v in group.vision]
    return [gr for gr in groups if any(gr.rows)], sorted(left)
