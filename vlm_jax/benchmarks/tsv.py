"""Reading VLMEvalKit-style benchmark TSV files (docs/benchmarks.md): one question a row, images as base64."""

import ast
import base64
import csv
import dataclasses
import io
import os
import string

from PIL import Image

from vlm_jax.data.images import load_image, to_rgb
from vlm_jax.errors import InputError

# pandas' default NA cells: VLMEvalKit and LLaVA's MMBench script read these files with pandas.read_csv, to which
# an option or hint cell holding one of these is absent, so reading them the same way asks the same questions.
_NA_CELLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})

# VLMEvalKit stores each image once (ImageBaseDataset.__init__): an image cell of 1 to 64 characters is the index of
# the row that holds the image.
_IMAGE_REF_MAX = 64

# A base64 cell may hold a whole image of many megabytes, past the csv module's default 128 KiB field limit.
_FIELD_LIMIT = 2**31 - 1

OPTION_LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class BenchmarkRow:
    """One question of a benchmark file. `options` maps each present option letter to its text, in letter order
    (empty for an open question); `answers` is the option letter for multiple choice, every reference answer for an
    open question, and empty when the file has no answers. `images` holds the decoded image files (base64 column
    `image`), `image_paths` the files named by `image_path` when there is no image cell. `group` is the index of the
    question this row is a circular copy of when the file says so (column g_index), else None; `rotation` counts the
    option rotations from the file's order. `where` names the file and line for error messages."""

    index: int | str
    question: str
    options: dict[str, str]
    answers: tuple[str, ...]
    hint: str | None
    category: str | None
    l2_category: str | None
    images: tuple[bytes, ...]
    image_paths: tuple[str, ...]
    group: int | str | None
    rotation: int
    where: str

    @property
    def answer(self) -> str:
        """The single answer: the option letter of a multiple-choice row."""
        if len(self.answers) != 1:
            raise InputError(f"{self.where}: {len(self.answers)} answers where one was expected (column 'answer')")
        return self.answers[0]


def load_images(row: BenchmarkRow) -> list[Image.Image]:
    """The row's images as RGB (`to_rgb`, the conversion VLMEvalKit's decode_base64_to_image makes): decoded from
    the base64 cells, or read from `image_paths` by `load_image`. An image that cannot be decoded is an InputError
    naming the row."""
    images = []
    try:
        for data in row.images:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # read_tsv checked the header only; truncated or corrupt pixels show here
                images.append(to_rgb(img))
        images += [load_image(p) for p in row.image_paths]
    except Exception as e:  # a corrupt image makes PIL's decoders raise nearly anything
        column = "image" if row.images else "image_path"
        raise InputError(f"{row.where}, column {column!r}: cannot decode the image ({type(e).__name__}: {e})") from e
    return images


def read_tsv(path: str) -> list[BenchmarkRow]:
    """The rows of a VLMEvalKit-style TSV (columns in docs/benchmarks.md), images decoded and checked. Any bad cell
    raises one InputError naming the file, its line and the column."""
    if not os.path.isfile(path):
        raise InputError(f"benchmark file not found: {path}")
    csv.field_size_limit(_FIELD_LIMIT)
    cells: list[tuple[str, int | str, dict[str, str]]] = []
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if not header:
                raise InputError(f"{path}: empty file, no header line")
            for name in ("index", "question"):
                if name not in header:
                    raise InputError(f"{path} line 1: no {name!r} column (the header has {', '.join(header)})")
            if len(set(header)) != len(header):
                raise InputError(f"{path} line 1: a column name appears twice in the header ({', '.join(header)})")
            line = reader.line_num + 1
            for values in reader:
                if values:
                    where = f"{path} line {line}"
                    if len(values) != len(header):
                        raise InputError(f"{where}: {len(values)} cells, the header has {len(header)}")
                    cell = dict(zip(header, values))
                    cells.append((where, _index(cell["index"], where, "index"), cell))
                line = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path} line {line}: not a readable TSV line ({e})") from None
    except UnicodeDecodeError as e:  # read in blocks, so the line is not known; the byte offset is in `e`
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    by_index: dict[int | str, str] = {}
    for where, index, _ in cells:
        if index in by_index:
            raise InputError(f"{where}, column 'index': index {index} is also on {by_index[index]}")
        by_index[index] = where
    image_cells = {index: cell.get("image", "") for _, index, cell in cells}
    decoded: dict[str, tuple[bytes, ...]] = {}
    return [_row(cell, index, where, os.path.dirname(path), image_cells, decoded) for where, index, cell in cells]


def _index(text: str, where: str, column: str) -> int | str:
    text = text.strip()
    if not text:
        raise InputError(f"{where}, column {column!r}: empty")
    try:
        return int(text)
    except ValueError:
        return text


def _text(cell: dict[str, str], column: str) -> str | None:
    value = cell.get(column, "")
    return None if value in _NA_CELLS else value


def _row(cell: dict[str, str], index: int | str, where: str, folder: str, image_cells: dict[int | str, str],
         decoded: dict[str, tuple[bytes, ...]]) -> BenchmarkRow:
    options = {k: v for k in OPTION_LETTERS if (v := _text(cell, k)) is not None}
    answers = _answers(cell.get("answer", ""), options, where)
    images = _images(image_cells[index], image_cells, decoded, where)
    paths = () if images else _paths(cell.get("image_path", ""), folder, where)
    group = _index(cell["g_index"], where, "g_index") if "g_index" in cell else None
    return BenchmarkRow(index=index, question=cell["question"], options=options, answers=answers,
                        hint=_text(cell, "hint"), category=cell.get("category") or None,
                        l2_category=cell.get("l2-category") or None, images=images, image_paths=paths, group=group,
                        rotation=0, where=where)


def _answers(text: str, options: dict[str, str], where: str) -> tuple[str, ...]:
    text = text.strip()
    if not text:
        return ()
    if options:
        if text not in options:
            raise InputError(f"{where}, column 'answer': {text!r} is not among the options {', '.join(options)}")
        return (text,)
    return tuple(_listed(text, where, "answer"))


def _listed(text: str, where: str, column: str) -> list[str]:
    """A cell as VLMEvalKit's toliststr reads it: a python list literal ("['a', 'b']") or one value."""
    if not (len(text) > 1 and text[0] == "[" and text[-1] == "]"):
        return [text]
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise InputError(f"{where}, column {column!r}: not a python list literal ({type(e).__name__}: {e})") from None
    if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) for v in values):
        raise InputError(f"{where}, column {column!r}: a list literal of strings or numbers was expected")
    return [str(v) for v in values]


def _images(text: str, image_cells: dict[int | str, str], decoded: dict[str, tuple[bytes, ...]],
            where: str) -> tuple[bytes, ...]:
    if text in _NA_CELLS:
        return ()
    if len(text) <= _IMAGE_REF_MAX:
        target = _index(text, where, "image")
        if len(image_cells.get(target, "")) <= _IMAGE_REF_MAX:
            raise InputError(f"{where}, column 'image': {text!r} refers to index {target}, and no row of that "
                             f"index holds an image")
        text = image_cells[target]
    if text not in decoded:
        decoded[text] = tuple(_decode(s, where) for s in _listed(text, where, "image"))
    return decoded[text]


def _decode(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text)
        with Image.open(io.BytesIO(data)):
            pass
    except Exception as e:  # binascii.Error, or whatever PIL raises for bytes that are no image it knows
        raise InputError(f"{where}, column 'image': not a base64-encoded image ({type(e).__name__}: {e})") from None
    return data


def _paths(text: str, folder: str, where: str) -> tuple[str, ...]:
    if text in _NA_CELLS:
        return ()
    paths = tuple(os.path.join(folder, p) for p in _listed(text, where, "image_path"))
    for p in paths:
        if not os.path.isfile(p):
            raise InputError(f"{where}, column 'image_path': no such file {p}")
    return paths
