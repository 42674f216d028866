"""Source over LLaVA-style conversation JSON or JSONL (LLaVA-Pretrain, llava_v1_5_mix665k, ShareGPT4V,
LLaVA-OneVision).

A .json file is a JSON list of {"id", "image" (optional: a relative path, or a list of them), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}; a .jsonl file holds one such object a line (blank lines skipped).
`path` is the file, or a folder holding `data.json`. Image paths resolve against `image_folder` when given, else
the file's folder. Records without "image" (or with an empty list) are text-only. Paths go through
`etils.epath`, so gs://... works where its filesystem library is installed. Structure (and UTF-8) is checked up
front; images load lazily (`header` reads only their sizes).
"""

import json
import os

from etils import epath

from vlm_jax.data.conversation import GPT, HUMAN, IMAGE_MARKER, place_markers
from vlm_jax.data.images import DEFAULT_MAX_PIXELS, image_size, load_image
from vlm_jax.errors import BadRecordError, InputError

DEFAULT_FILE = "data.json"


def resolve_json(path: str) -> str:
    """The conversation file of data.path: the .json / .jsonl file itself, or a folder's data.json."""
    if not path:
        raise InputError("data.path is empty; the llava_json source needs a .json or .jsonl file or a folder with "
                         f"{DEFAULT_FILE}")
    json_file = str(epath.Path(path) / DEFAULT_FILE) if epath.Path(path).is_dir() else path
    if not epath.Path(json_file).is_file():
        raise InputError(f"data.path: conversation json not found: {json_file}")
    return json_file


def _folder(file: str) -> str:
    """The folder of `file`, absolute when local."""
    return str(epath.Path(file).parent) if "://" in file else os.path.dirname(os.path.abspath(file))


def printable(text: str) -> str:
    """`text` with any code point UTF-8 cannot encode (a lone surrogate) written as a \\u escape, so that a
    message naming it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_utf8(value, path: str) -> str | None:
    """Where a string in `value` (part of a parsed JSON item, at `path`) holds a code point UTF-8 cannot encode,
    and which: a byte of the file that is not UTF-8 (read as surrogateescape's U+DC80..U+DCFF) or a lone
    surrogate escape ("\\ud800"); None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(value[e.start])
            what = (f"the byte 0x{c - 0xDC00:02x}, which is not UTF-8 (or a \\u{c:04x} escape)"
                    if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate \\u{c:04x}")
            return f"{path} holds {what} at character {e.start}"
        return None
    if isinstance(value, dict):
        parts = [(f"{path}.{printable(k)}" if path else printable(k), v) for k, v in value.items()]
        parts = [(f"a key of {path or 'the example'}", k) for k in value] + parts
    elif isinstance(value, list):
        parts = [(f"{path}[{j}]", v) for j, v in enumerate(value)]
    else:
        return None
    return next((found for where, v in parts if (found := _not_utf8(v, where))), None)


def _is_jsonl(file: str) -> bool:
    return file.endswith(".jsonl")


class LlavaJsonSource:
    """Random-access source; records are dict(id, images (a list of RGB PIL images, [] for text-only),
    conversations, qtype).

    A record that cannot be used (its structure, text that is not UTF-8, its `<image>` markers not one per image
    when it has several, an image missing, corrupt or over `max_pixels` pixels) raises BadRecordError naming the
    file, the example's index (a .jsonl's line) and id and the reason: at load when the structure is wrong, unless
    `keep_bad`, which keeps it in the record list (so indices and the shuffle stay those of the file) and raises
    when it is read. Pickles with its parsed records (no open files)."""

    def __init__(self, path: str, image_folder: str = "", max_pixels: int = DEFAULT_MAX_PIXELS,
                 keep_bad: bool = False):
        self.json_file = resolve_json(path)
        self.image_folder = image_folder or _folder(self.json_file)
        self.max_pixels = max_pixels
        # A byte that is not UTF-8 becomes a lone surrogate here (surrogateescape), found by _not_utf8 in its own
        # record, which alone is bad.
        text = epath.Path(self.json_file).read_bytes().decode("utf-8", "surrogateescape")
        # A .jsonl's records are named by their line (blank lines skipped), a .json list's by their index.
        self.lines: list[int] | None = None
        items = self._jsonl(text) if _is_jsonl(self.json_file) else self._json(text)
        self.records: list[dict | BadRecordError] = []
        self._bad_ids: dict[int, str | None] = {}  # a bad record's id as the file gives it (None: not an object)
        for i, item in enumerate(items):
            try:
                self.records.append(self._parse(i, item))
            except BadRecordError as e:
                if not keep_bad:
                    raise
                self.records.append(e)
                self._bad_ids[i] = str(item.get("id", i)) if isinstance(item, dict) else None

    def _json(self, text: str) -> list:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{self.json_file}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise InputError(f"{self.json_file}: expected a JSON list of examples, got {type(items).__name__}")
        return items

    def _jsonl(self, text: str) -> list:
        items, self.lines = [], []
        # Lines end at "\n" alone: str.splitlines would also cut at U+2028 and the like, which JSON strings may hold.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{self.json_file}: line {number}: not valid JSON: {e}") from None
            self.lines.append(number)
        return items

    def _label(self, index: int, item) -> str:
        where = f"{self.json_file}: " + (f"example {index}" if self.lines is None else f"line {self.lines[index]}")
        return f"{where} (id {printable(str(item.get('id', index)))})" if isinstance(item, dict) else where

    def _parse(self, index: int, item) -> dict:
        where = self._label(index, item)
        if not isinstance(item, dict):
            raise BadRecordError(f"expected an object, got {type(item).__name__}", where)
        bad_text = _not_utf8(item, "")
        if bad_text:
            raise BadRecordError(bad_text, where)
        ex_id = str(item.get("id", index))
        convs = item.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise BadRecordError("missing or empty 'conversations' list", where)
        turns = []
        for j, turn in enumerate(convs):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadRecordError(f"conversations[{j}] needs 'from' and 'value' keys, got {turn!r}", where)
            role, value = turn["from"], turn["value"]
            if role not in (HUMAN, GPT):
                raise BadRecordError(f"conversations[{j}] has role {role!r}, expected {HUMAN!r} or {GPT!r}", where)
            if not isinstance(value, str):
                raise BadRecordError(f"conversations[{j}] 'value' is {type(value).__name__}, not str", where)
            turns.append((role, value))
        images = item.get("image", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(im, str) and im for im in images):
            raise BadRecordError(f"'image' must be a relative path string or a list of them, got {images!r}",
                                 where)
        if len(images) > 1:
            markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
            if markers != len(images):
                raise BadRecordError(f"{markers} {IMAGE_MARKER} markers for {len(images)} images (a record of "
                                     "several images needs one marker per image, in image order)", where)
        return dict(id=ex_id, images=tuple(images), conversations=place_markers(turns, len(images)),
                    qtype=str(item.get("qtype", "")))

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        """Record `index` as errors name it: the file, the example's index (a .jsonl's line) and its id."""
        rec = self.records[index]
        return rec.where if isinstance(rec, BadRecordError) else self._label(index, rec)

    def record_id(self, index: int) -> str | None:
        """Record `index`'s id, a bad record's too (None where it is not an object)."""
        rec = self.records[index]
        return self._bad_ids[index] if isinstance(rec, BadRecordError) else rec["id"]

    def image_paths(self, index: int) -> list[str]:
        """Where record `index`'s images are: the image folder joined with each relative path."""
        return [str(epath.Path(self.image_folder) / name) for name in self.parsed(index)["images"]]

    def __getitem__(self, index: int) -> dict:
        return dict(self.parsed(index), images=self._read(index, load_image))

    def header(self, index: int) -> dict:
        """Record `index` with `images` their (width, height) read from the files' headers, no pixels decoded ([]
        for text-only): what data/epochs.py counts an epoch's rows from. It raises what __getitem__ would, short
        of what only decoding the pixels finds (a truncated or corrupt image body)."""
        return dict(self.parsed(index), images=self._read(index, image_size))

    def parsed(self, index: int) -> dict:
        """Record `index` as parsed, `images` its images' relative paths, nothing read; a bad one raises its
        BadRecordError."""
        rec = self.records[index]
        if isinstance(rec, BadRecordError):
            raise rec
        return rec

    def _read(self, index: int, read) -> list:
        """read(path, the pixel limit) of each of record `index`'s images, naming the file, the example and its id
        in any error."""
        try:
            return [read(path, self.max_pixels) for path in self.image_paths(index)]
        except (FileNotFoundError, ValueError) as e:
            raise BadRecordError(str(e), self.where(index)) from e
