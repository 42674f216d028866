"""Source over LLaVA-style conversation JSON (LLaVA-Pretrain, llava_v1_5_mix665k, ShareGPT4V).

The file is a JSON list of {"id", "image" (optional, relative path), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}. `path` is the .json file, or a folder holding
`data.json`. Image paths resolve against `image_folder` when given, else the json file's folder.
Records without "image" are text-only. Structure (and UTF-8) is checked up front; images load lazily (`header`
reads only their sizes).
"""

import json
import os

from vlm_jax.data.conversation import GPT, HUMAN, IMAGE_MARKER
from vlm_jax.data.images import DEFAULT_MAX_PIXELS, image_size, load_image
from vlm_jax.errors import BadRecordError, InputError

DEFAULT_FILE = "data.json"


def resolve_json(path: str) -> str:
    if not path:
        raise InputError("data.path is empty; the llava_json source needs a .json file or a folder with "
                         f"{DEFAULT_FILE}")
    json_file = os.path.join(path, DEFAULT_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(json_file):
        raise InputError(f"data.path: conversation json not found: {json_file}")
    return json_file


def _image_first(text: str) -> str:
    # LLaVA's preprocess_multimodal moves the image marker to the front of its turn; do the same so
    # prompts match what released checkpoints were trained on.
    if IMAGE_MARKER not in text:
        return text
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


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


class LlavaJsonSource:
    """Random-access source; records are dict(id, image (PIL or None), conversations, qtype).

    A record that cannot be used (its structure, text that is not UTF-8, its image missing, corrupt or over
    `max_pixels` pixels) raises BadRecordError naming the json file, the example's index and id and the reason: at
    load when the structure is wrong, unless `keep_bad`, which keeps it in the record list (so indices and the
    shuffle stay those of the file) and raises when it is read."""

    def __init__(self, path: str, image_folder: str = "", max_pixels: int = DEFAULT_MAX_PIXELS,
                 keep_bad: bool = False):
        self.json_file = resolve_json(path)
        self.image_folder = image_folder or os.path.dirname(os.path.abspath(self.json_file))
        self.max_pixels = max_pixels
        with open(self.json_file, "rb") as f:
            # A byte that is not UTF-8 becomes a lone surrogate here (surrogateescape), found by _not_utf8 in its
            # own record, which alone is bad.
            text = f.read().decode("utf-8", "surrogateescape")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{self.json_file}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise InputError(f"{self.json_file}: expected a JSON list of examples, got {type(items).__name__}")
        self.records: list[dict | BadRecordError] = []
        for i, item in enumerate(items):
            try:
                self.records.append(self._parse(i, item))
            except BadRecordError as e:
                if not keep_bad:
                    raise
                self.records.append(e)

    def _label(self, index: int, item) -> str:
        where = f"{self.json_file}: example {index}"
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
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRecordError(f"'image' must be a relative path string, got {image!r}", where)
        if image is not None:
            turns = [(role, _image_first(text)) for role, text in turns]
        return dict(id=ex_id, image=image, conversations=turns, qtype=str(item.get("qtype", "")))

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        """Record `index` as errors name it: the json file, the example's index and its id."""
        rec = self.records[index]
        return rec.where if isinstance(rec, BadRecordError) else self._label(index, rec)

    def __getitem__(self, index: int) -> dict:
        rec = self._record(index)
        return dict(rec, image=None if rec["image"] is None else self._read(index, load_image))

    def header(self, index: int) -> dict:
        """Record `index` with `image` its (width, height) read from the file's header, no pixels decoded (None
        for text-only): what data/epochs.py counts an epoch's rows from. It raises what __getitem__ would, short
        of what only decoding the pixels finds (a truncated or corrupt image body)."""
        rec = self._record(index)
        return dict(rec, image=None if rec["image"] is None else self._read(index, image_size))

    def _record(self, index: int) -> dict:
        rec = self.records[index]
        if isinstance(rec, BadRecordError):
            raise rec
        return rec

    def _read(self, index: int, read):
        """read(path of record `index`'s image, the pixel limit), naming the json, the example and its id in any
        error."""
        path = os.path.join(self.image_folder, self.records[index]["image"])
        try:
            return read(path, self.max_pixels)
        except (FileNotFoundError, ValueError) as e:
            raise BadRecordError(str(e), self.where(index)) from e
