"""Weighted mixtures of training sources (data.mixture; docs/contracts.md, "Mixtures"): each entry's own config
and seed, and the stateless schedule that interleaves the sources' streams by weight."""

import dataclasses
import fractions
import math
import numbers
import os
import re
import zlib
from collections.abc import Mapping

import grain
import ml_collections
import numpy as np

from vlm_jax.errors import InputError

# The data keys a source of data.mixture may set for itself (the rest are the run's), and its optional name.
MIXTURE_KEYS = ("name", "source", "path", "image_folder", "max_image_pixels", "num_train", "exclude_qtypes",
                "min_image_size", "max_image_size")


@dataclasses.dataclass(frozen=True)
class TrainingSource:
    """One source of the training stream: its `name` (metrics.jsonl's examples/<name> and loss/<name>), `config`
    (the run's, with the source's own data keys and shuffle seed: what make_source, the kind's record_to_example and
    shard_stream read of it) and `weight` (its share of the stream is weight / the sum of the weights)."""

    name: str
    config: ml_collections.ConfigDict
    weight: float


def _default_name(source: str, path: str) -> str:
    """A source's name when its entry gives none: its file's or folder's name without extension, or its kind."""
    base = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] if path else ""
    return base or source


def training_sources(config) -> list[TrainingSource]:
    """The training sources: each entry of data.mixture, or without one the single source data.source /
    data.path names (its config is `config` itself, so a run without a mixture reads exactly what it read before
    mixtures existed). One InputError naming the entry for a malformed entry, an unknown key, a weight that is not
    positive or a name given twice."""
    d = config.data
    if not d.mixture:
        return [TrainingSource(_default_name(d.source, d.path), config, 1.0)]
    sources, seen = [], {}
    for k, entry in enumerate(d.mixture):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], Mapping)):
            raise InputError(f"data.mixture entry {k} is {entry!r}, not (source_config dict, weight)")
        keys, weight = dict(entry[0]), entry[1]
        name = keys.pop("name", None) or _default_name(keys.get("source", d.source), keys.get("path", d.path))
        what = f"data.mixture entry {k} ({name!r})"
        unknown = sorted(set(keys) - set(MIXTURE_KEYS), key=str)
        if unknown:
            raise InputError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; a source sets "
                             f"{', '.join(MIXTURE_KEYS)}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
            raise InputError(f"{what}: weight {weight!r} must be a positive number")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise InputError(f"{what}: name {name!r} must be letters, digits, '_', '.' or '-' (it names metrics)")
        if name in seen:
            raise InputError(f"{what}: entry {seen[name]} is named {name!r} too: give one of them another 'name'")
        seen[name] = k
        sub = config.copy_and_resolve_references()
        sub.data.mixture = []
        for key, value in keys.items():
            try:
                sub.data[key] = value
            except (TypeError, ValueError) as e:
                raise InputError(f"{what}: {key}={value!r}: {e}") from None
        # Its own shuffle (and synthetic scenes): two sources never walk their records in step.
        sub.seed = int(np.random.SeedSequence([config.seed % 2**32, zlib.crc32(name.encode())]).generate_state(1)[0])
        sources.append(TrainingSource(name, sub, float(weight)))
    return sources


def mixture_names(config) -> tuple[str, ...]:
    """The names of data.mixture's sources when it mixes two or more (what per-source metrics are logged for),
    else ()."""
    sources = training_sources(config)
    return tuple(s.name for s in sources) if len(sources) > 1 else ()


class WeightedSchedule(grain.transforms.DatasetSelectionMap):
    """Item i of a mixed stream -> (source k, item j of source k's stream): a deterministic interleave in which
    source k's share of every prefix of n items is n * w_k (w_k its weight over the weights' sum) give or take
    half an item per level of a binary tree over the sources: under one item for up to four sources. Each node
    of the tree splits its items between its two halves of the sources, the left taking floor(n q + 1/2) of its
    first n (q the left half's share of the node's weight, an exact fraction); so item i's source and its index
    in that source's stream take O(log K) steps, with no state. Its length is the prefix in which no source's
    stream passes its own length (grain's mix length); the schedule goes on past it, as the streams do."""

    def __init__(self, weights: list[float], lengths: list[int]):
        w = [fractions.Fraction(x) for x in weights]
        self._length = max(1, min(math.floor(n * sum(w) / wk) for n, wk in zip(lengths, w)))
        self._share: dict[tuple[int, int], fractions.Fraction] = {}
        nodes = [(0, len(w))]
        while nodes:
            lo, hi = nodes.pop()
            if hi - lo > 1:
                mid = (lo + hi) // 2
                self._share[lo, hi] = sum(w[lo:mid]) / sum(w[lo:hi])
                nodes += [(lo, mid), (mid, hi)]
        self._sources = len(w)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        lo, hi, i = 0, self._sources, int(index)
        half = fractions.Fraction(1, 2)
        while hi - lo > 1:
            mid, q = (lo + hi) // 2, self._share[lo, hi]
            left = math.floor(i * q + half)  # items of the left half among the node's first i
            if math.floor((i + 1) * q + half) > left:
                hi, i = mid, left
            else:
                lo, i = mid, i - left
        return lo, i
