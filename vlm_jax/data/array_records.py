"""Source over array_record shards of LLaVA-format records, as vlm-prepare-data (vlm_jax/cli/prepare_data.py) writes
them (data.source="array_record", data.path = the folder; docs/contracts.md, "Records").

A folder holds `metadata.json` (the shards, their record counts, a token length histogram and the bad records left
out) and the shards `<name>-<k>-of-<n>.array_record` (k, n five digits), written with group_size 1 so that every
record is read on its own. Each array_record entry is one record: its header as compact UTF-8 JSON (id,
conversations as [role, text] pairs with their `<image>` markers placed, qtype, and per image its relative path,
upright (width, height) and byte count), a newline, then its images' encoded file bytes back to back, never
decoded pixels. Records are random access through grain's ArrayRecordDataSource, which opens the shard files
lazily, so the source pickles as a few paths and counts.
"""

import bisect
import json

import grain
from etils import epath

from vlm_jax.data.images import DEFAULT_MAX_PIXELS, load_image, pixel_problem
from vlm_jax.errors import BadRecordError, InputError

METADATA = "metadata.json"
FORMAT = "vlm_jax array_record records 1"  # metadata.json's "format": what this module reads


def shard_name(name: str, shard: int, shards: int) -> str:
    """File name of shard `shard` of `shards` of the data named `name`."""
    return f"{name}-{shard:05d}-of-{shards:05d}.array_record"


def encode_record(record: dict, images: list[tuple[str, tuple[int, int], bytes]]) -> bytes:
    """One shard entry of `record` (id, conversations, qtype) and its images as (relative path, upright (width,
    height), encoded bytes)."""
    header = dict(id=record["id"], conversations=[list(turn) for turn in record["conversations"]],
                  qtype=record["qtype"], images=[dict(path=path, size=list(size), bytes=len(data))
                                                 for path, size, data in images])
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    return b"".join([text.encode("utf-8"), b"\n"] + [data for _, _, data in images])


def decode_record(entry: bytes) -> tuple[dict, list[bytes]]:
    """(header, each image's encoded bytes) of a shard entry (`encode_record`)."""
    end = entry.index(b"\n")
    header = json.loads(entry[:end].decode("utf-8"))
    blobs, pos = [], end + 1
    for image in header["images"]:
        blobs.append(entry[pos:pos + image["bytes"]])
        pos += image["bytes"]
    if pos != len(entry):
        raise ValueError(f"the entry holds {len(entry) - pos} bytes past its images'")
    return header, blobs


def read_metadata(folder: str) -> dict:
    """metadata.json of a vlm-prepare-data folder, checked to be of this format."""
    path = epath.Path(folder) / METADATA
    if not folder or not path.is_file():
        raise InputError(f"data.path: {path} not found; data.source='array_record' reads a folder written by "
                         "vlm-prepare-data")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not vlm-prepare-data metadata of format {FORMAT!r}")
    return meta


class ArrayRecordSource:
    """Random-access source over a vlm-prepare-data folder; records are dict(id, images (RGB PIL images, [] for
    text-only), conversations, qtype), as LlavaJsonSource gives the records they were written from. An image that
    cannot be decoded, or is over `max_pixels` pixels, raises BadRecordError naming the shard file, the record's
    index in it and its id."""

    def __init__(self, folder: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        meta = read_metadata(folder)
        self.folder, self.max_pixels = folder, max_pixels
        self.files = [str(epath.Path(folder) / shard["file"]) for shard in meta["shards"]]
        counts = [shard["records"] for shard in meta["shards"]]
        missing = [f for f in self.files if not epath.Path(f).is_file()]
        if missing:
            raise InputError(f"data.path: shard {missing[0]} of {folder}/{METADATA} not found")
        if not sum(counts):
            raise InputError(f"data.path: {folder} holds no records")
        self.starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
        # Read instructions "file[start:end]" spare opening every shard to count its records; readers open lazily,
        # in whichever process reads.
        self.data = grain.sources.ArrayRecordDataSource(
            [f"{f}[0:{n}]" for f, n in zip(self.files, counts) if n])

    def __len__(self) -> int:
        return self.starts[-1]

    def _place(self, index: int) -> tuple[str, int]:
        """(shard file, index within it) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)}) of {self.folder}")
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.files[shard], index - self.starts[shard]

    def where(self, index: int) -> str:
        """Record `index` as errors name it: its shard file, its index there and its id."""
        file, local = self._place(index)
        try:
            record_id = decode_record(self.data[index])[0]["id"]
        except Exception:  # an entry that cannot be read is named without its id
            return f"{file}: record {local}"
        return f"{file}: record {local} (id {record_id})"

    def _read(self, index: int) -> tuple[dict, list[bytes]]:
        """The record's header as a source gives it (conversations as (role, text) pairs, without images) and its
        images' header entries and bytes."""
        try:
            header, blobs = decode_record(self.data[index])
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise BadRecordError(f"unreadable shard entry: {type(e).__name__}: {e}", self.where(index)) from None
        record = dict(id=header["id"], conversations=[tuple(turn) for turn in header["conversations"]],
                      qtype=header["qtype"])
        for image in header["images"]:
            problem = pixel_problem(f"image {image['path']}", *image["size"], self.max_pixels)
            if problem:
                raise BadRecordError(problem, self.where(index))
        return dict(record, images=header["images"]), blobs

    def __getitem__(self, index: int) -> dict:
        record, blobs = self._read(index)
        try:
            images = [load_image(data, self.max_pixels, image["path"])
                      for image, data in zip(record["images"], blobs)]
        except ValueError as e:
            raise BadRecordError(str(e), self.where(index)) from e
        return dict(record, images=images)

    def header(self, index: int) -> dict:
        """Record `index` with `images` their upright (width, height) as written in the shard, no pixels decoded
        ([] for text-only): what data/epochs.py counts an epoch's rows from."""
        record, _ = self._read(index)
        return dict(record, images=[tuple(image["size"]) for image in record["images"]])
