"""Convert LLaVA-format data to array_record shards: vlm-prepare-data --src FILE.json|FILE.jsonl --dst OUT
[--image_folder DIR] [--shards N] [--skip_bad] [--threads T] [--config FILE[:ARG] --config.KEY=VALUE ...]

Writes OUT/<name>-<k>-of-<N>.array_record (name: the source file's, k and N five digits), shard k holding the
source's records k*n/N to (k+1)*n/N in their order, each with its images as their encoded file bytes (never decoded
pixels; docs/contracts.md, "Records"), and OUT/metadata.json: counts (records, images, text-only, per shard), a
histogram of the examples' token lengths (the config's tokenizer, template and image-input kind: each image's
placeholder run included, as a training row holds it) against data.seq_len, and the bad records found (file, index,
id, reason). Training reads OUT with --config.data.source=array_record --config.data.path=OUT.

Every record is checked as training reads it: its structure, its images read and fully decoded (over
data.max_image_pixels is bad), its conversation tokenised. A bad record stops the conversion with one line naming
it, or with --skip_bad is left out and listed in the metadata. A shard is written to a .partial file, renamed when
complete; a rerun after an interruption skips the complete shards and finishes with the same bytes as an
uninterrupted run (OUT/.prepare/ holds each finished shard's counts). Paths may be gs://... where etils.epath's
filesystem library is installed.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import tempfile

import ml_collections
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.config import check_values
from vlm_jax.data.array_records import FORMAT, METADATA, encode_record, shard_name
from vlm_jax.data.image_kinds import data_kind
from vlm_jax.data.images import image_size, load_image
from vlm_jax.data.llava_json import LlavaJsonSource
from vlm_jax.data.tokenizer import run_tokenizer
from vlm_jax.errors import BadRecordError, InputError

WORK_DIR = ".prepare"  # OUT/.prepare/<shard>.json: a finished shard's counts, lengths and bad records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="the LLaVA-format .json or .jsonl file (or a folder with "
                                                     "data.json)")
    parser.add_argument("--image_folder", default="", help="where the records' image paths resolve (default: the "
                                                           "source file's folder)")
    parser.add_argument("--dst", required=True, help="the output folder")
    parser.add_argument("--shards", type=int, default=1, help="array_record files to write (default 1)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave bad records out, listing them in the metadata, instead of stopping on the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads reading, decoding and tokenising records (default: the CPU count)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def _entry(source: LlavaJsonSource, index: int, measure,
           max_pixels: int) -> tuple[bytes, int, int] | BadRecordError:
    """(shard entry, token length of its example, images) of record `index`, each image read and decoded as
    training decodes it; or the BadRecordError naming the record."""
    try:
        record = source.parsed(index)
    except BadRecordError as e:
        return e
    images = []
    try:
        for name, path in zip(record["images"], source.image_paths(index)):
            if not epath.Path(path).is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            data = epath.Path(path).read_bytes()
            load_image(data, max_pixels, path)  # what only decoding finds: a truncated or corrupt body
            images.append((name, image_size(data, max_pixels, path), data))
        length = len(measure(dict(record, images=[size for _, size, _ in images])))
    except (FileNotFoundError, ValueError) as e:  # BadRecordError is a ValueError: the encoder's names the example
        return BadRecordError(e.reason if isinstance(e, BadRecordError) else str(e), source.where(index))
    return encode_record(record, images), length, len(images)


@contextlib.contextmanager
def _written(final: epath.Path):
    """A local path to write `final` to: beside it as .partial (renamed onto it on success), or for a remote
    `final` a local temporary file copied there on success."""
    if "://" not in str(final):
        partial = f"{final}.partial"
        yield partial
        os.replace(partial, final)
        return
    with tempfile.TemporaryDirectory() as tmp:
        partial = os.path.join(tmp, final.name)
        yield partial
        epath.Path(partial).copy(final, overwrite=True)


def _entries(source: LlavaJsonSource, indices: range, measure, max_pixels: int, threads: int):
    """`_entry` of each of `indices`, in order, computed by `threads` threads (PIL's decoders and the tokenizer
    release the GIL) a chunk at a time, so memory holds a bounded number of entries however large the shard."""
    chunk = 64 * threads
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(indices.start, indices.stop, chunk):
            yield from pool.map(lambda i: _entry(source, i, measure, max_pixels),
                                range(start, min(start + chunk, indices.stop)))


def _write_shard(source: LlavaJsonSource, indices: range, final: epath.Path, measure, max_pixels: int,
                 skip_bad: bool, threads: int, bar) -> dict:
    """Writes the records `indices` of `source` to shard file `final`; returns its counts, lengths and bad
    records."""
    stats = dict(records=0, images=0, text_only=0, lengths=[], bad=[])
    with _written(final) as partial:
        writer = ArrayRecordWriter(partial, "group_size:1")  # every record read on its own (random access)
        try:
            for i, result in zip(indices, _entries(source, indices, measure, max_pixels, threads)):
                if isinstance(result, BadRecordError):
                    if not skip_bad:
                        raise InputError(f"{result} (--skip_bad leaves bad records out)")
                    stats["bad"].append(dict(file=source.json_file, index=i, id=source.record_id(i),
                                             reason=result.reason))
                else:
                    entry, length, images = result
                    writer.write(entry)
                    stats["records"] += 1
                    stats["images"] += images
                    stats["text_only"] += not images
                    stats["lengths"].append(length)
                bar.update(1)
        finally:
            writer.close()
    return stats


def token_histogram(lengths: list[int], seq_len: int) -> dict:
    """The examples' token lengths: their most, how many are over `seq_len`, and how many fall in each bin (up to
    64, 128, 256, ... tokens: [up_to, count] pairs, each bin over the previous one's up_to)."""
    tops = [64]
    while tops[-1] < max(lengths, default=0):
        tops.append(2 * tops[-1])
    counts = collections.Counter(next(top for top in tops if n <= top) for n in lengths)
    bins = [[top, counts[top]] for top in tops]
    return dict(seq_len=seq_len, max=max(lengths, default=0), over_seq_len=sum(n > seq_len for n in lengths),
                histogram=bins)


def prepare(config: ml_collections.ConfigDict, tokenizer, src: str, dst: str, image_folder: str = "",
            shards: int = 1, skip_bad: bool = False, progress: bool = True, threads: int = 1) -> dict:
    """Converts `src` to `shards` array_record shards in `dst` (the module docstring); returns the metadata."""
    if shards < 1:
        raise InputError(f"--shards={shards}: write 1 or more shards")
    d = config.data
    source = LlavaJsonSource(src, image_folder, d.max_image_pixels, keep_bad=True)
    if len(source) < shards:
        raise InputError(f"{source.json_file} has {len(source)} records, fewer than --shards={shards}")
    kind = data_kind(config.model)
    measure = kind.record_to_example(config, tokenizer).footprint
    name = epath.Path(source.json_file).name.rsplit(".", 1)[0]
    out, work = epath.Path(dst), epath.Path(dst) / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    # What a finished shard was written with: a rerun with anything else starts over rather than mixing them.
    settings = dict(src=source.json_file, image_folder=source.image_folder, shards=shards, skip_bad=skip_bad,
                    config=hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest())
    n, parts = len(source), []
    with tqdm(total=n, desc=f"prepare {name}", unit="record", disable=not progress) as bar:
        for k in range(shards):
            file, indices = shard_name(name, k, shards), range(k * n // shards, (k + 1) * n // shards)
            done = work / f"{file}.json"
            if (out / file).is_file() and done.is_file() and json.loads(done.read_text())["settings"] == settings:
                stats = json.loads(done.read_text())["stats"]
                bar.update(len(indices))
            else:
                stats = _write_shard(source, indices, out / file, measure, d.max_image_pixels, skip_bad, threads, bar)
                with _written(done) as partial:  # before the next shard: its counts are what makes it finished
                    with open(partial, "w") as f:
                        json.dump(dict(settings=settings, stats=stats), f)
            parts.append((file, stats))
    shard_rows = [dict(file=file, **{k: s[k] for k in ("records", "images", "text_only")}) for file, s in parts]
    meta = dict(
        format=FORMAT, source=source.json_file, image_folder=source.image_folder,
        **{k: sum(row[k] for row in shard_rows) for k in ("records", "images", "text_only")},
        bad=sum(len(s["bad"]) for _, s in parts), shards=shard_rows,
        token_lengths=dict(template=d.template, image_inputs=kind.name,
                           **token_histogram([n for _, s in parts for n in s["lengths"]], d.seq_len)),
        bad_records=[b for _, s in parts for b in s["bad"]])
    with _written(out / METADATA) as partial:
        with open(partial, "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv, add_arguments, workdir=False, distributed=False,
                         config_optional=True)
    with reported_errors():
        try:
            check_values(config)
        except ValueError as e:
            raise InputError(str(e)) from None
        meta = prepare(config, run_tokenizer(config), args.src, args.dst, args.image_folder, args.shards,
                       args.skip_bad, not args.no_progress, args.threads)
        print(json.dumps({k: meta[k] for k in ("records", "images", "text_only", "bad")}), flush=True)


if __name__ == "__main__":
    main()
