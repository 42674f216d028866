"""Source over LLaVA-style conversation JSON (LLaVA-Pretrain, llava_v1_5_mix665k, ShareGPT4V).

The file is a JSON list of {"id", "image" (optional, relative path), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}. `path` is the .json file, or a folder holding
`data.json`. Image paths resolve against `image_folder` when given, else the json file's folder.
Records without "image" are text-only. Structure is checked up front; images load lazily (`header` reads
only their sizes).
"""

import json
import os

from vlm_jax.data.conversation import GPT, HUMAN, IMAGE_MARKER
from vlm_jax.data.images import image_size, load_image

DEFAULT_FILE = "data.json"


def resolve_json(path: str) -> str:
    if not path:
        raise ValueError("data.path is empty; the llava_json source needs a .json file or a folder with "
                         f"{DEFAULT_FILE}")
    json_file = os.path.join(path, DEFAULT_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"data.path: conversation json not found: {json_file}")
    return json_file


def _image_first(text: str) -> str:
    # LLaVA's preprocess_multimodal moves the image marker to the front of its turn; do the same so
    # prompts match what released checkpoints were trained on.
    if IMAGE_MARKER not in text:
        return text
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


class LlavaJsonSource:
    """Random-access source; records are dict(id, image (PIL or None), conversations, qtype)."""

    def __init__(self, path: str, image_folder: str = ""):
        self.json_file = resolve_json(path)
        self.image_folder = image_folder or os.path.dirname(os.path.abspath(self.json_file))
        try:
            with open(self.json_file) as f:
                items = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.json_file}: not valid JSON: {e}") from e
        if not isinstance(items, list):
            raise ValueError(f"{self.json_file}: expected a JSON list of examples, got {type(items).__name__}")
        self.records = [self._parse(i, item) for i, item in enumerate(items)]

    def _parse(self, index: int, item) -> dict:
        where = f"{self.json_file}: example {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        ex_id = str(item.get("id", index))
        where = f"{self.json_file}: example {index} (id {ex_id})"
        convs = item.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise ValueError(f"{where}: missing or empty 'conversations' list")
        turns = []
        for j, turn in enumerate(convs):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError(f"{where}: conversations[{j}] needs 'from' and 'value' keys, got {turn!r}")
            role, value = turn["from"], turn["value"]
            if role not in (HUMAN, GPT):
                raise ValueError(f"{where}: conversations[{j}] has role {role!r}, expected "
                                 f"{HUMAN!r} or {GPT!r}")
            if not isinstance(value, str):
                raise ValueError(f"{where}: conversations[{j}] 'value' is {type(value).__name__}, not str")
            turns.append((role, value))
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a relative path string, got {image!r}")
        if image is not None:
            turns = [(role, _image_first(text)) for role, text in turns]
        return dict(id=ex_id, image=image, conversations=turns, qtype=str(item.get("qtype", "")))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        return dict(rec, image=None if rec["image"] is None else self._read(index, load_image))

    def header(self, index: int) -> dict:
        """Record `index` with `image` its (width, height) read from the file's header, no pixels decoded (None
        for text-only): what data/epochs.py counts an epoch's rows from."""
        rec = self.records[index]
        return dict(rec, image=None if rec["image"] is None else self._read(index, image_size))

    def _read(self, index: int, read):
        """read(path of record `index`'s image), naming the json, the example and its id in any error."""
        rec = self.records[index]
        path = os.path.join(self.image_folder, rec["image"])
        try:
            return read(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.json_file}: example {index} (id {rec['id']}): {e}") from e
        except ValueError as e:
            raise ValueError(f"{self.json_file}: example {index} (id {rec['id']}): {e}") from e
