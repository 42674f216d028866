"""Built-in synthetic VQA source: coloured shapes on plain or noisy backgrounds, no files needed.

Every record is a pure function of (seed, split, index), so the source supports random access
(grain shuffles it by index) and two processes asking for the same index get the same record.
Each shape sits well inside its own image quadrant, so shapes never overlap and every
position answer is unambiguous.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QTYPES = ("color", "shape", "count", "position", "caption")
# Held-out questions are the short-answer types that exact match can score; captions only train.
EVAL_QTYPES = QTYPES[:4]
SPLITS = {"train": 0, "eval": 1}

# Grey backgrounds in three brightness bands; a colour closer than this to the background is never
# drawn on it (so white never lands on light grey, nor black on dark grey).
_BACKGROUND_BANDS = ((30, 60), (110, 140), (195, 225))
_MIN_CONTRAST = 120.0
_MAX_ASPECT = 2.0
_CAPTION_FRACTION = 0.2
_COUNT_FRACTION = 0.5
# Questions that must find an object by its shape (colour) or by colour and shape (position, whose second answer
# token must find it again) are learned slowest; finding it by colour (shape questions) is learned fast, so shape
# questions get the fewest turns; the weights trade colour against position (docs/experiments.md 1).
_TURN_WEIGHTS = {"color": 2.0, "shape": 1.0, "position": 3.0}
# A third of the position turns ask one axis ("Is the red circle on the left or the right?"): the row and the
# column lookups are then also taught as a one-word answer, which is what gets the first answer token of
# "top left" right (docs/experiments.md 1).
_ONE_AXIS_FRACTION = 1 / 3


@dataclasses.dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    quadrant: str
    cx: float
    cy: float
    r: float


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    noise: float
    shapes: tuple[Shape, ...]
    qa: tuple[tuple[str, str, str], ...]  # (qtype, question, answer) per turn, in order

    @property
    def qtype(self) -> str:
        return self.qa[0][0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shapes: tuple[Shape, ...]) -> str:
    """'in the top left, a red circle; in the bottom right, an orange star.' in reading order."""
    return "; ".join(f"in the {s.quadrant}, {_article(s.color)} {s.color} {s.shape}" for s in shapes) + "."


def _questions(rng: np.random.Generator, shapes: tuple[Shape, ...], split: str,
               exclude: tuple[str, ...] = ()) -> tuple[tuple[str, str, str], ...]:
    """(qtype, q, a) turns this scene can answer unambiguously.

    Eval records ask one short-answer question of a uniformly drawn feasible type. Train records
    are either a caption alone or several short questions about one image, like multi-turn LLaVA
    data: several supervised answers per image teach far more per second than one. No turn may
    give away another's answer, or the model learns to copy from the text and never looks at the
    image; so each shape is the subject of at most one question, a count comes before any of
    them, and a caption (which names everything) is never mixed with questions. Train records never
    ask a type in `exclude` (a held-out question type); without exclusions the draws are unchanged.
    """
    subjects = {t: [s for s in shapes if _asks(t, s, shapes)] for t in EVAL_QTYPES}
    if split != "train":
        feasible = [t for t in EVAL_QTYPES if subjects[t]]
        qtype = feasible[rng.integers(len(feasible))]
        return (_question(qtype, subjects[qtype][rng.integers(len(subjects[qtype]))], shapes),)
    if rng.random() < _CAPTION_FRACTION and "caption" not in exclude:
        return (("caption", "Describe the image.", caption(shapes)),)
    turns = []
    for i in rng.permutation(len(shapes))[:rng.integers(1, len(shapes) + 1)]:
        feasible = [t for t in ("color", "shape", "position") if shapes[i] in subjects[t] and t not in exclude]
        if feasible:
            weights = np.array([_TURN_WEIGHTS[t] for t in feasible])
            qtype = feasible[rng.choice(len(feasible), p=weights / weights.sum())]
            axis = ""
            if qtype == "position" and rng.random() < _ONE_AXIS_FRACTION:
                axis = ("column", "row")[rng.integers(2)]
            turns.append(_question(qtype, shapes[i], shapes, axis))
    # The count comes first: after it, the number of turns would hint at the answer.
    count = [_question("count", shapes[0], shapes)] if rng.random() < _COUNT_FRACTION else []
    if "count" in exclude:
        count = []
    elif not turns:  # every question about a shape is of an excluded type; a count always fits
        count = [_question("count", shapes[0], shapes)]
    return tuple(count + turns)


def all_questions(scene: Scene) -> tuple[tuple[str, str, str], ...]:
    """Every (qtype, q, a) turn the scene can answer, the caption included, whatever the training mix: a
    corpus (the demo tokenizer's) that must not change when the mix does."""
    turns = [("caption", "Describe the image.", caption(scene.shapes)),
             _question("count", scene.shapes[0], scene.shapes)]
    kinds = (("color", ""), ("shape", ""), ("position", ""), ("position", "column"), ("position", "row"))
    turns += [_question(t, s, scene.shapes, axis) for s in scene.shapes for t, axis in kinds
              if _asks(t, s, scene.shapes)]
    return tuple(turns)


def _asks(qtype: str, s: Shape, shapes: tuple[Shape, ...]) -> bool:
    """Whether a question of this type about s names it unambiguously."""
    if qtype == "color":
        return sum(x.shape == s.shape for x in shapes) == 1
    if qtype == "shape":
        return sum(x.color == s.color for x in shapes) == 1
    return True  # position names (colour, shape), distinct within a scene; count names nothing


def _question(qtype: str, s: Shape, shapes: tuple[Shape, ...], axis: str = "") -> tuple[str, str, str]:
    """One turn; a position question asks the whole quadrant, or with `axis` ("row", "column") one half of it."""
    if qtype == "color":
        return qtype, f"What color is the {s.shape}?", s.color
    if qtype == "shape":
        return qtype, f"What shape is the {s.color} object?", s.shape
    if qtype == "count":
        return qtype, "How many shapes are there?", str(len(shapes))
    row, column = s.quadrant.split()
    if axis == "column":
        return qtype, f"Is the {s.color} {s.shape} on the left or the right?", column
    if axis == "row":
        return qtype, f"Is the {s.color} {s.shape} at the top or the bottom?", row
    return qtype, f"Where is the {s.color} {s.shape}?", s.quadrant


def sample_scene(seed: int, split: str, index: int, min_size: int, max_size: int,
                 exclude: tuple[str, ...] = ()) -> Scene:
    """The scene (layout, question, answer) of one record, without rendering pixels; train records never ask
    a question type in `exclude`."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {sorted(SPLITS)}, got {split!r}")
    # Split id in the entropy gives train and eval disjoint random streams for the same seed.
    rng = np.random.default_rng([seed, SPLITS[split], index])
    width = int(rng.integers(min_size, max_size + 1))
    lo, hi = max(min_size, int(np.ceil(width / _MAX_ASPECT))), min(max_size, int(width * _MAX_ASPECT))
    height = int(rng.integers(lo, hi + 1))

    band = _BACKGROUND_BANDS[rng.integers(len(_BACKGROUND_BANDS))]
    grey = int(rng.integers(band[0], band[1] + 1))
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-8, 9, size=3))
    noise = float(rng.uniform(4.0, 14.0)) if rng.random() < 0.5 else 0.0
    colors = [c for c, rgb in COLORS.items()
              if np.linalg.norm(np.subtract(rgb, background)) >= _MIN_CONTRAST]

    n = int(rng.integers(1, 5))
    quadrants = sorted(rng.choice(4, size=n, replace=False).tolist())
    pairs = rng.choice(len(colors) * len(SHAPES), size=n, replace=False)
    qw, qh = width / 2, height / 2
    shapes = []
    for q, pair in zip(quadrants, pairs):
        # Large in its quadrant: the demo's 32 px global view gives a quadrant one 16 px patch, and at
        # a smaller shape leaves too few of that patch's pixels to tell the five shapes apart (docs/experiments.md 1).
        r = float(rng.uniform(0.38, 0.44)) * min(qw, qh)
        margin = 0.03 * min(qw, qh)
        x0, y0 = (q % 2) * qw, (q // 2) * qh
        cx = float(rng.uniform(x0 + r + margin, x0 + qw - r - margin))
        cy = float(rng.uniform(y0 + r + margin, y0 + qh - r - margin))
        color, shape = colors[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
        shapes.append(Shape(color, shape, QUADRANTS[q], cx, cy, r))
    shapes = tuple(shapes)
    return Scene(width, height, background, noise, shapes, _questions(rng, shapes, split, exclude))


# Label sets of the dense per-patch labels (`patch_labels`); class `len(values)` of shape and colour means "no
# shape here". Quadrant is where the patch centre lies, so the tower's output says where each token is from.
LABEL_SETS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "quadrant": QUADRANTS}


def patch_labels(scene: Scene, rows: int, cols: int,
                 box: tuple[float, float, float, float] | None = None) -> dict[str, np.ndarray]:
    """Per-patch class ids [rows * cols] (row-major) of a patch grid laid over `box` = (x0, y0, x1, y1) in image
    pixels (default: the whole image; a tile's box for a tile), for each of LABEL_SETS. Shape and colour are
    those of the shape whose bounding box covers at least half of the patch, or lies at least half inside it
    (a coarse patch holding a whole shape), else "no shape"."""
    bx0, by0, bx1, by1 = box or (0.0, 0.0, float(scene.width), float(scene.height))
    pw, ph = (bx1 - bx0) / cols, (by1 - by0) / rows
    x0, y0 = bx0 + np.arange(cols) * pw, by0 + np.arange(rows) * ph
    labels = {name: np.full((rows, cols), len(LABEL_SETS[name]), np.int32) for name in ("shape", "color")}
    best = np.zeros((rows, cols))
    for s in scene.shapes:
        ox = np.clip(np.minimum(x0 + pw, s.cx + s.r) - np.maximum(x0, s.cx - s.r), 0, None)
        oy = np.clip(np.minimum(y0 + ph, s.cy + s.r) - np.maximum(y0, s.cy - s.r), 0, None)
        cover = oy[:, None] * ox[None, :] / min(pw * ph, (2 * s.r) ** 2)
        hit = (cover >= 0.5) & (cover > best)
        best = np.where(hit, cover, best)
        labels["shape"][hit] = SHAPES.index(s.shape)
        labels["color"][hit] = LABEL_SETS["color"].index(s.color)
    right = (x0 + pw / 2 >= scene.width / 2)[None, :]
    bottom = (y0 + ph / 2 >= scene.height / 2)[:, None]
    labels["quadrant"] = (2 * bottom + right).astype(np.int32)
    return {name: v.reshape(-1) for name, v in labels.items()}


def _polygon(s: Shape) -> list[tuple[float, float]]:
    if s.shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), [s.r] * 3
    elif s.shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = [s.r if i % 2 == 0 else 0.45 * s.r for i in range(10)]
    else:
        raise ValueError(f"no polygon for shape {s.shape!r}")
    return [(s.cx + rad * np.cos(t), s.cy + rad * np.sin(t)) for t, rad in zip(angles, radii)]


def render(scene: Scene, seed: int, split: str, index: int) -> Image.Image:
    """Draws the scene; the background noise is seeded like the scene, so rendering is deterministic."""
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    base = np.broadcast_to(np.array(scene.background, np.float32), (scene.height, scene.width, 3))
    if scene.noise:
        base = base + rng.standard_normal(base.shape, dtype=np.float32) * np.float32(scene.noise)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
        elif s.shape == "square":
            h = 0.85 * s.r
            draw.rectangle([s.cx - h, s.cy - h, s.cx + h, s.cy + h], fill=fill)
        elif s.shape == "cross":
            t = 0.32 * s.r
            draw.rectangle([s.cx - s.r, s.cy - t, s.cx + s.r, s.cy + t], fill=fill)
            draw.rectangle([s.cx - t, s.cy - s.r, s.cx + t, s.cy + s.r], fill=fill)
        else:
            draw.polygon(_polygon(s), fill=fill)
    return img


class SyntheticSource:
    """Random-access synthetic source; records are dict(id, images (one PIL image), conversations, qtype)."""

    def __init__(self, split: str, size: int, seed: int, min_image_size: int, max_image_size: int,
                 exclude: tuple[str, ...] = ()):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {sorted(SPLITS)}, got {split!r}")
        unknown = sorted(set(exclude) - set(QTYPES))
        # Position and count questions fit every scene, so keeping one of them leaves every record a question.
        if unknown or not {"position", "count"} - set(exclude):
            raise ValueError(f"data.exclude_qtypes {list(exclude)}: must be question types of {list(QTYPES)} "
                             "and keep 'position' or 'count'")
        self.exclude = tuple(exclude)
        if not 0 < min_image_size <= max_image_size:
            raise ValueError(f"need 0 < data.min_image_size <= data.max_image_size, got "
                             f"{min_image_size}, {max_image_size}")
        self.split, self.size, self.seed = split, size, seed
        self.min_image_size, self.max_image_size = min_image_size, max_image_size

    def __len__(self) -> int:
        return self.size

    def where(self, index: int) -> str:
        """Record `index` as errors name it."""
        return f"synthetic {self.split} example {index} (id synthetic-{self.split}-{index})"

    def scene(self, index: int) -> Scene:
        return sample_scene(self.seed, self.split, index, self.min_image_size, self.max_image_size, self.exclude)

    def __getitem__(self, index: int) -> dict:
        return dict(self.header(index), images=[render(self.scene(index), self.seed, self.split, index)])

    def header(self, index: int) -> dict:
        """Record `index` with `images` its image's [(width, height)], not rendered: what data/epochs.py counts an
        epoch's rows from."""
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic {self.split} index {index} out of range [0, {self.size})")
        scene = self.scene(index)
        return dict(
            id=f"synthetic-{self.split}-{index}",
            images=[(scene.width, scene.height)],
            conversations=[turn for i, (_, q, a) in enumerate(scene.qa)
                           for turn in (("human", ("<image>\n" if i == 0 else "") + q), ("gpt", a))],
            qtype=scene.qtype,
        )
