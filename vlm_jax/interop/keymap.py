"""The one engine every family's key map runs through, for import and export alike.

A key map is data: rows `(torch name, vlm_jax path(s), layout[, fuse])`. A torch name containing `{i}`
is one tensor per layer; its vlm_jax leaf is the scanned stack, whose leading `layers` axis holds layer
i. `{i*k+j}` names torch layer k*i + j instead, for stacks whose scanned unit holds k torch layers (the
BLIP-2 Q-Former scans pairs: a layer with cross-attention, then one without). Several vlm_jax paths in one
row mean a fused torch tensor whose pieces sit on its dim 0, either as blocks (`concat`: `[up; gate]`,
`[Wq; Wk; Wv]`) or interleaved per head group (`interleave`: rows viewed as `(groups, pieces, ...)`,
groups = the head axis of each vlm_jax piece). A `None` piece is a slice the model does not hold, shaped
like the row's first real piece (BLIP-2's key bias inside `qkv.bias`).

Source tensors the model holds no parameter for, but the torch class does (`KeyMap.extras`, the layers past
`hf_layers`), and tensors with `None` slices are *carried*: import keeps them untouched beside the parameters
(`carried`; vlm_jax/checkpoints/directory.py EXTRA_FILE) and export writes them back from there, so a round
trip gives every tensor the source had. Without a carried copy (a model trained from scratch) export writes
an identity instead: ones for norm scales, zeros otherwise (`Filler`), zeros for a `None` slice.

Layouts turn one (unfused) torch tensor into one vlm_jax leaf and back, exactly (reshapes and
transposes only, so a round trip is bit-exact):
  SAME     identical shape (norms, embeddings, 1-D tensors); UNSQUEEZE1/2: torch adds 1 or 2 leading
           size-1 axes (BLIP-2's `position_embedding [1, P, W]`, `class_embedding [1, 1, W]`)
  FLAT     torch [prod] <-> vlm_jax [heads, head_dim] (q/k/v biases)
  LINEAR   nn.Linear [out, in] <-> Dense kernel [in, *out] (transpose, then split the out dim)
  LINEAR2  nn.Linear [out, H*D] <-> Dense kernel [H, D, out] (output projections, two input axes)
  CONV     Conv2d [O, C, p, p] <-> Dense kernel [C*p*p, O] over patches flattened in (C, kh, kw) order
  CONV3D   Conv3d [O, C, 2, p, p] <-> Dense kernel [C*2*p*p, O] (Qwen2-VL's patch embedding; patches in (C, T, kh, kw))
"""

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from vlm_jax.checkpoints.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # same | flat | linear | conv
    in_axes: int = 1  # linear: how many leading vlm_jax kernel axes are contracted inputs
    channels: int = 3  # conv: image channels
    frames: int = 0  # conv: the T axis of a Conv3d kernel (0: Conv2d)
    leading_ones: int = 0  # same: size-1 axes the torch tensor has in front

    def torch_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "same":
            return (1,) * self.leading_ones + tuple(jax_shape)
        if self.kind == "flat":
            return (math.prod(jax_shape),)
        n_in, n_out = math.prod(jax_shape[:self.in_axes]), math.prod(jax_shape[self.in_axes:])
        if self.kind == "linear":
            return (n_out, n_in)
        p = math.isqrt(n_in // (self.channels * max(self.frames, 1)))
        return (n_out, self.channels, *((self.frames,) if self.frames else ()), p, p)

    def to_jax(self, t: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
        if self.kind in ("linear", "conv"):
            t = t.reshape(t.shape[0], -1).T
        return t.reshape(jax_shape)

    def to_torch(self, x: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
        shape = self.torch_shape(jax_shape)
        if self.kind in ("linear", "conv"):
            x = x.reshape(math.prod(jax_shape[:self.in_axes]), -1).T
        return x.reshape(shape)


SAME = Layout("same")
UNSQUEEZE1 = Layout("same", leading_ones=1)
UNSQUEEZE2 = Layout("same", leading_ones=2)
FLAT = Layout("flat")
LINEAR = Layout("linear")
LINEAR2 = Layout("linear", in_axes=2)
CONV = Layout("conv")
CONV3D = Layout("conv", frames=2)


def norm_rows(torch_name: str, path: str) -> tuple[tuple, ...]:
    """The rows of a torch LayerNorm (`weight`, `bias`) <-> a vlm_jax LayerNorm (`scale`, `bias`)."""
    return ((torch_name + ".weight", path + "/scale", SAME), (torch_name + ".bias", path + "/bias", SAME))


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """A family's rows plus how to read other naming generations of the same tensors.

    `renames`: (regex anchored with `^`, replacement) applied in order to every source name before matching (e.g. the
    transformers >= 4.52 in-memory LLaVA names -> the legacy names the rows use).
    `ignore`: regexes of source tensors that are not the torch class's parameters (buffers, other towers, a
    text branch the class does not build): skipped on import, never carried.
    `extras`: (torch name, vlm_jax path it is shaped like) for tensors the torch class has but our model
    does not compute with (CLIP post_layernorm): carried (see the module docstring).
    `hf_layers`: vlm_jax stack prefix -> number of layers the torch model has when it has more than we
    build (a ViT cut at feature_layer); the extra layers are carried like `extras`.
    """

    rows: tuple[tuple, ...]
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    extras: tuple[tuple[str, str], ...] = ()
    hf_layers: tuple[tuple[str, int], ...] = ()

    def prefixed(self, torch_prefix: str, jax_prefix: str) -> "KeyMap":
        """This map mounted under a torch name prefix and a vlm_jax subtree."""
        def jp(p: str) -> str:
            return f"{jax_prefix}/{p}"

        rows = tuple((torch_prefix + r[0], tuple(p and jp(p) for p in _paths(r[1])), *r[2:]) for r in self.rows)
        extras = tuple((torch_prefix + name, jp(like)) for name, like in self.extras)
        ignore = tuple(re.escape(torch_prefix) + pattern for pattern in self.ignore)
        # Renames are anchored at the start of a name (`^...`), so they move under the prefix too.
        renames = tuple((f"^{re.escape(torch_prefix)}{pattern.removeprefix('^')}", torch_prefix + repl)
                        for pattern, repl in self.renames)
        return KeyMap(rows, renames, ignore, extras, tuple((jp(k), n) for k, n in self.hf_layers))

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.rows + other.rows, self.renames + other.renames, self.ignore + other.ignore,
                      self.extras + other.extras, self.hf_layers + other.hf_layers)

    def with_renames(self, renames: tuple[tuple[str, str], ...]) -> "KeyMap":
        return dataclasses.replace(self, renames=renames + self.renames)


def _paths(p: str | tuple[str | None, ...]) -> tuple[str | None, ...]:
    return (p,) if isinstance(p, str) else tuple(p)


_LAYER_FIELD = re.compile(r"\{i(?:\*(\d+))?(?:\+(\d+))?\}")


def layer_name(name: str, i: int) -> str:
    """A layered torch name for stacked index i: `{i}` -> i, `{i*k+j}` -> k*i + j."""
    return _LAYER_FIELD.sub(lambda m: str(i * int(m[1] or 1) + int(m[2] or 0)), name)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One concrete torch tensor: where its pieces live in vlm_jax and how to convert them."""

    name: str
    pieces: tuple[tuple[str | None, int | None], ...]  # (vlm_jax path or None for a zero slice, layer index)
    piece_shapes: tuple[tuple[int, ...], ...]  # per-layer vlm_jax shape of each piece
    layout: Layout
    fuse: str
    shape: tuple[int, ...]  # torch shape

    def to_jax(self, t: np.ndarray) -> list[np.ndarray]:
        """Torch tensor -> one per-layer vlm_jax array per piece."""
        torch_shapes = [self.layout.torch_shape(s) for s in self.piece_shapes]
        if self.fuse == "concat":
            parts = np.split(t, np.cumsum([s[0] for s in torch_shapes])[:-1], axis=0)
        elif self.fuse == "interleave":
            groups = self.piece_shapes[0][-2]
            grouped = t.reshape(groups, -1, *t.shape[1:])
            bounds = np.cumsum([s[0] // groups for s in torch_shapes])[:-1]
            parts = [p.reshape(s) for p, s in zip(np.split(grouped, bounds, axis=1), torch_shapes)]
        else:
            parts = [t]
        return [self.layout.to_jax(p, s) for p, s in zip(parts, self.piece_shapes)]

    def to_torch(self, xs: list[np.ndarray | None]) -> np.ndarray:
        """Per-layer vlm_jax arrays (None for a slice the model does not hold: zeros) -> the torch tensor."""
        dtype = next(x.dtype for x in xs if x is not None)
        parts = [self.layout.to_torch(np.zeros(s, dtype) if x is None else x, s)
                 for x, s in zip(xs, self.piece_shapes)]
        if self.fuse == "interleave":
            groups = self.piece_shapes[0][-2]
            grouped = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]
            return np.concatenate(grouped, axis=1).reshape(self.shape)
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


@dataclasses.dataclass(frozen=True)
class Filler:
    """A torch tensor our model has no counterpart for (see KeyMap.extras / hf_layers)."""

    name: str
    shape: tuple[int, ...]
    value: float


def expand(keymap: KeyMap, jax_shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[Tensor], list[Filler]]:
    """Every concrete torch tensor of `keymap` for a model whose leaves have `jax_shapes` (path -> shape).

    Fails if a vlm_jax leaf is claimed by no row or by two, so a table cannot silently skip a parameter.
    """
    hf_layers = dict(keymap.hf_layers)
    tensors, fillers, claimed = [], [], {}
    for row in keymap.rows:
        name, paths, layout, fuse = row[0], _paths(row[1]), row[2], (row[3] if len(row) > 3 else "")
        real = [p for p in paths if p is not None]
        missing = [p for p in real if p not in jax_shapes]
        if missing:
            raise ConversionError(f"key map row {name!r} names vlm_jax leaves the model lacks: {missing}")
        for p in real:
            if p in claimed:
                raise ConversionError(f"vlm_jax leaf {p!r} is claimed by {claimed[p]!r} and {name!r}")
            claimed[p] = name
        layered = _LAYER_FIELD.search(name) is not None
        shapes = [tuple(jax_shapes[p or real[0]][1:] if layered else jax_shapes[p or real[0]]) for p in paths]
        torch_shapes = [layout.torch_shape(s) for s in shapes]
        shape = (sum(s[0] for s in torch_shapes), *torch_shapes[0][1:]) if len(paths) > 1 else torch_shapes[0]
        for i in range(jax_shapes[real[0]][0] if layered else 1):
            index = i if layered else None
            tensors.append(Tensor(layer_name(name, i) if layered else name, tuple((p, index) for p in paths),
                                  tuple(shapes), layout, fuse, shape))
        if layered:
            stack = real[0].rsplit("/layers/", 1)[0] + "/layers"
            for i in range(jax_shapes[real[0]][0], hf_layers.get(stack, 0)):
                fillers.append(Filler(layer_name(name, i), shape, _fill_value(real[0])))
    unclaimed = sorted(set(jax_shapes) - set(claimed))
    if unclaimed:
        raise ConversionError(f"the key map has no row for vlm_jax leaves {unclaimed}")
    for name, like in keymap.extras:
        fillers.append(Filler(name, tuple(jax_shapes[like]), _fill_value(like)))
    return tensors, fillers


def _fill_value(path: str) -> float:
    return 1.0 if path.endswith("/scale") else 0.0


def canonical_name(keymap: KeyMap, name: str) -> str:
    for pattern, repl in keymap.renames:
        name = re.sub(pattern, repl, name)
    return name


def match_source(
    keymap: KeyMap, tensors: list[Tensor], fillers: list[Filler], source: Mapping[str, tuple[int, ...]],
    where: str,
) -> dict[str, str]:
    """Maps each needed torch name to its name in `source` (name -> shape), or raises one error listing
    every missing, unexpected and wrongly shaped tensor."""
    wanted = {t.name: t.shape for t in tensors}
    known = {f.name: f.shape for f in fillers}
    ignore = [re.compile(p) for p in keymap.ignore]
    found, unexpected, bad_shape = {}, [], []
    for src, shape in source.items():
        name = canonical_name(keymap, src)
        if name in wanted or name in known:
            want = wanted.get(name, known.get(name))
            if tuple(shape) != tuple(want):
                bad_shape.append(f"{src}: {list(shape)}, expected {list(want)}")
            if name in found.values():
                unexpected.append(f"{src} {list(shape)} (a second copy of {name})")
            found[src] = name
        elif not any(r.fullmatch(name) for r in ignore):
            unexpected.append(f"{src} {list(shape)}")
    have = set(found.values())
    missing = [f"{n} {list(s)}" for n, s in wanted.items() if n not in have]
    if missing or unexpected or bad_shape:
        lines = [f"{where} does not match the expected tensors:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            lines += [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items] if items else []
        raise ConversionError("\n".join(lines))
    return {name: src for src, name in found.items() if name in wanted}


def carried(tensors: list[Tensor], fillers: list[Filler], source: Mapping[str, tuple[int, ...]],
            keymap: KeyMap) -> dict[str, str]:
    """Canonical name -> name in `source` of the source tensors import carries (see the module docstring): the
    fillers the source has, and the tensors holding a slice the model does not (kept whole). Run after
    `match_source`, which has checked their shapes."""
    wanted = {f.name for f in fillers} | {t.name for t in tensors if any(p is None for p, _ in t.pieces)}
    return {name: src for src in source if (name := canonical_name(keymap, src)) in wanted}


def leaf_sources(tensors: list[Tensor]) -> dict[str, list[tuple[Tensor, int]]]:
    """vlm_jax path -> [(tensor, piece index)] in layer order."""
    out: dict[str, list[tuple[Tensor, int]]] = {}
    for t in tensors:
        for k, (path, _) in enumerate(t.pieces):
            if path is not None:
                out.setdefault(path, []).append((t, k))
    return out


def is_stack(sources: list[tuple[Tensor, int]]) -> bool:
    """Whether a leaf is a layer stack: one torch tensor (piece) per row of its axis 0."""
    first, k = sources[0]
    return first.pieces[k][1] is not None


def build_leaf(
    sources: list[tuple[Tensor, int]], load: Callable[[str], np.ndarray], dtype: np.dtype,
    layers: slice = slice(None),
) -> np.ndarray:
    """One vlm_jax leaf from its torch tensor(s), loaded one at a time; of a layer stack, only the rows `layers`."""
    if not is_stack(sources):
        first, k = sources[0]
        return first.to_jax(load(first.name))[k].astype(dtype)
    chosen = sources[layers]
    out = np.empty((len(chosen), *chosen[0][0].piece_shapes[chosen[0][1]]), dtype)
    for row, (t, k) in enumerate(chosen):
        out[row] = t.to_jax(load(t.name))[k]
    return out


def torch_tensors(
    tensors: Iterable[Tensor], fillers: list[Filler], leaf: Callable[[str, int | None], np.ndarray], dtype: np.dtype,
    carried_copy: Callable[[str], np.ndarray | None] = lambda name: None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(torch name, array) for every tensor of the torch model, built one at a time (each when the iterator
    reaches it) from `leaf(path, layer)`; fillers and the slices the model does not hold come from
    `carried_copy(name)` (the tensor import carried, in `dtype`) where it has them."""
    for t in tensors:
        xs = [None if p is None else leaf(p, i) for p, i in t.pieces]
        copy = carried_copy(t.name) if any(x is None for x in xs) else None
        if copy is not None:
            xs = [x if x is not None else c for x, c in zip(xs, t.to_jax(copy))]
        yield t.name, np.ascontiguousarray(t.to_torch(xs))
    for f in fillers:
        copy = carried_copy(f.name)
        yield f.name, np.full(f.shape, f.value, dtype) if copy is None else copy
