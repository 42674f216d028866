"""Examples/s of the peer LLaVA model (bench/peer.py) on a LLaVA-665k-like mix: vlm_jax's packed rows through its
real data pipeline against transformers fed as LLaVA feeds it (modality-length grouped, padded batches), the same
weights and the same examples, timed interleaved in one run. Prints one JSON line.

  python bench/throughput.py [--examples 96 --seq_len 2048 --hf_batch 8 --hf_world 1 --batch 0
                              --tiles_per_row 4 --pack_window 1024 --rounds 4 --passes 1] [size flags of bench/peer.py]

The examples: `--examples` conversations whose lengths follow the packing bench's LLaVA-665k-like text mix
(bench/packing.py TEXT: its kinds, medians and spreads, 9 % text-only), each with one image unless text-only, an image
a run of (image_size / patch)**2 placeholders (256 at CLIP's 224 px, patch 14), an example over `--seq_len`
(LLaVA-1.5's model_max_length, 2048) cut to it when it is drawn. They are written as a LLaVA json dataset: a JPEG of
160-480 px per image and conversations in LLaVA-1.5's vicuna_v1 format, worded in a word-level tokenizer the bench
builds (one token a word, `--vocab` entries, the image placeholder the last id, outside it), so that each conversation
tokenises to its drawn length. vlm_jax reads them as a training run does (data.source=llava_json, the vicuna_v1
template with LLaVA's system text and loss mask, which with a tokenizer that has no lone prefix-space token also
trains each "ASSISTANT:"'s colon; LLaVA-1.5's pad-to-square and CLIP resize and crop; data.epochs=1, pack_window
planning) into rows of `--tiles_per_row` tile slots (4: the fewest at which a row's tokens, not its slots, bind on
this mix: 3 leave 21 % of the rows' tokens padding, 4 and 5 the same 9.7 %),
`--batch` rows a step (0: as many rows as `--hf_batch` examples' tokens fill on average). transformers gets the same
examples, the token ids, loss masks and pixels of vlm_jax's own tokenised ones, in the order of LLaVA's
LengthGroupedSampler with group_by_modality_length (llava/train/llava_trainer.py: images and text-only apart, random
megabatches of `--hf_world` x `--hf_batch` sorted by their word counts and dealt to the `--hf_world` devices, the two
modalities' last partial megabatches joined at the front or end; every device's batches run here in turn),
`--hf_batch` examples a batch right-padded to its longest with an attention mask and labels -100 off the loss, as
DataCollatorForSupervisedDataset pads; it runs LlavaForConditionalGeneration(labels=...) with torch.optim.AdamW and
clip_grad_norm_ as bench/train_step.py does. LLaVA itself also runs its tower on a zero image for every text-only
example of a batch; here transformers sees only the real images.

Each side first runs its first batch untimed (vlm_jax compiles), then each pass (`--passes`) sends all the examples
through both: each side's steps are cut into `--rounds` chunks run in turn, the first side swapping every round.
Building the batches (reading, preprocessing, tokenising, packing or padding) happens before, on both sides, and is
not timed. `examples_per_s_*`: the examples over the seconds of a pass's steps, the median of the passes;
`examples_per_s_ratio_vs_hf`: vlm_jax's over transformers'. `tokens_per_s_*`: the examples' tokens (padding left
out) per second. `padding_fraction_*`: padding tokens over the tokens each side computes (every row or batch
position; vlm_jax's last step may hold empty rows); `vision_padding_fraction_vlm_jax`: empty tile slots over slots
(transformers' tower sees the images alone). `steps_*`: optimizer steps a pass.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import packing, peer  # noqa: E402

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # the word-level tokenizer's first ids
IMAGE_SIDES = (160, 480)  # pixels, each side of an image file


def tokenizer_words(a: argparse.Namespace, folder: str) -> list[str]:
    """Saves at `folder` a word-level tokenizer of `--vocab` - 1 entries (the specials, the words of LLaVA's
    vicuna_v1 system text and roles, then filler words "w0", "w1", ...) and returns the filler words."""
    import tokenizers
    import transformers

    from vlm_jax.data.conversation import VICUNA_V1_SYSTEM

    pre = tokenizers.pre_tokenizers.Whitespace()
    fixed = sorted({w for w, _ in pre.pre_tokenize_str(VICUNA_V1_SYSTEM + " USER: ASSISTANT:")})
    size = peer.image_token(a)  # the placeholder id stays outside the vocabulary
    fill = size - len(SPECIALS) - len(fixed)
    if fill < 16:
        raise SystemExit(f"--vocab {a.vocab} leaves {fill} filler words; take at least {size - fill + 17}")
    words = [f"w{i}" for i in range(fill)]
    vocab = {w: i for i, w in enumerate([*SPECIALS, *fixed, *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(list(SPECIALS))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>").save_pretrained(folder)
    return words


def conversation_encoder(a: argparse.Namespace, folder: str):
    """The vicuna_v1 encoder (LLaVA's system text) of the tokenizer at `folder`, as vlm_jax's pipeline builds it."""
    from vlm_jax.data.conversation import VICUNA_V1_SYSTEM, ConversationEncoder, get_template
    from vlm_jax.data.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(folder)
    ids = special_ids(tok, peer.image_token(a))
    return ConversationEncoder(get_template("vicuna_v1"), tok, ids.image, ids.bos, ids.eos, VICUNA_V1_SYSTEM)


def draw_lengths(rng: np.random.Generator, n: int, seq_len: int, image_tokens: int) -> list[tuple[int, bool]]:
    """n examples of the mix as (tokens, placeholders included, cut to seq_len; whether it has an image)."""
    drawn = [packing.text_length(rng, kind) for kind in packing.text_kinds(rng, n)]
    return [(min(seq_len, text + image_tokens * has_image), has_image) for text, has_image in drawn]


def write_dataset(a: argparse.Namespace, folder: str, words: list[str], encoder) -> list[int]:
    """Writes `folder`/data.json and its images/: `--examples` LLaVA records of `draw_lengths`, each worded to its
    drawn length (longer only where the system text and one exchange of a word each exceed it); returns each one's
    token count as vlm_jax tokenises it."""
    from PIL import Image

    rng, words = np.random.default_rng(a.seed), np.array(words)
    image = peer.image_tokens(a)
    probe = [len(encoder.encode([("human", "w0"), ("gpt", "w0")] * k, [], "probe").tokens) for k in (1, 2)]
    per_exchange = probe[1] - probe[0] - 2  # template tokens of one exchange; the rest is bos and system text
    base = probe[0] - per_exchange - 2
    os.makedirs(os.path.join(folder, "images"))
    records, lengths = [], []
    for i, (target, has_image) in enumerate(draw_lengths(rng, a.examples, a.seq_len, image)):
        budget = target - image * has_image - base
        exchanges = max(1, min(int(rng.integers(1, 5)), budget // (per_exchange + 8)))
        n_words = max(2 * exchanges, budget - exchanges * per_exchange)
        turns = []
        for share in np.array_split(np.arange(n_words), exchanges):
            question = max(1, len(share) // 4)
            turns += [("human", " ".join(rng.choice(words, question))),
                      ("gpt", " ".join(rng.choice(words, len(share) - question)))]
        record = dict(id=str(i))
        if has_image:
            record["image"] = f"images/{i}.jpg"
            turns[0] = ("human", "<image>\n" + turns[0][1])
            h, w = rng.integers(*IMAGE_SIDES, size=2, endpoint=True)
            pixels = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((int(w), int(h)))
            pixels.save(os.path.join(folder, record["image"]), quality=90)
        record["conversations"] = [{"from": role, "value": value} for role, value in turns]
        records.append(record)
        lengths.append(len(encoder.encode(turns, [image] * has_image, record["id"]).tokens))
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump(records, f)
    return lengths


# -- transformers, LLaVA's way -------------------------------------------------------------------------------------

def even_chunks(indices: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """LLaVA's split_to_even_chunks: `indices` (longest first) dealt to `chunks` chunks of equal counts, each to the
    chunk of the fewest words so far that is not full; round-robin when the count does not divide."""
    if len(indices) % chunks:
        return [indices[k::chunks] for k in range(chunks)]
    size = len(indices) // chunks
    out, words = [[] for _ in range(chunks)], [0] * chunks
    for i in indices:
        k = words.index(min(words))
        out[k].append(i)
        words[k] = math.inf if len(out[k]) == size else words[k] + lengths[i]
    return out


def length_grouped(lengths: list[int], batch: int, world: int) -> list[int]:
    """LLaVA's get_length_grouped_indices: a random permutation (torch's global generator) cut into megabatches of
    world x batch, each sorted longest first and dealt into `world` even chunks."""
    import torch

    order = torch.randperm(len(lengths)).tolist()
    mega = world * batch
    out = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        out += [i for chunk in even_chunks(group, lengths, world) for i in chunk]
    return out


def modality_grouped(lengths: list[int], batch: int, world: int) -> list[int]:
    """LLaVA's get_modality_length_grouped_indices over modality lengths (word counts, negative for text-only): each
    modality length-grouped on its own, their megabatches but the last shuffled together, the two last ones joined
    and put first when they fill a megabatch (the rest of them last), else last. LLaVA asserts both modalities are
    present; a set of one is grouped alone here."""
    import torch

    mega = world * batch
    megabatches, leftover = [], []
    for sign in (1, -1):
        indices = [i for i, n in enumerate(lengths) if n * sign > 0]
        if not indices:
            continue
        grouped = [indices[k] for k in length_grouped([lengths[i] * sign for i in indices], batch, world)]
        parts = [grouped[k:k + mega] for k in range(0, len(grouped), mega)]
        megabatches += parts[:-1]
        leftover += parts[-1]
    megabatches = [megabatches[k] for k in torch.randperm(len(megabatches)).tolist()]
    if len(leftover) >= mega:
        megabatches.insert(0, leftover[:mega])
        leftover = leftover[mega:]
    if leftover:
        megabatches.append(leftover)
    return [i for m in megabatches for i in m]


def modality_lengths(records: list[dict]) -> list[int]:
    """LLaVA's LazySupervisedDataset.modality_lengths: the whitespace-split words of a record's turns, negative for a
    text-only record."""
    lengths = [sum(len(turn["value"].split()) for turn in r["conversations"]) for r in records]
    return [n if "image" in r else -n for n, r in zip(lengths, records)]


def padded_batch(examples: list[dict], pad_id: int) -> dict:
    """DataCollatorForSupervisedDataset's batch of `examples` (tokens, loss, pixels NCHW or None): input_ids right
    padded with `pad_id` to the longest, labels -100 off the loss and on padding, attention_mask, and the images
    in example order (None without one)."""
    import torch

    longest = max(len(ex["tokens"]) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for r, ex in enumerate(examples):
        tokens = torch.from_numpy(ex["tokens"]).long()
        n = len(tokens)
        input_ids[r, :n] = tokens
        labels[r, :n] = torch.where(torch.from_numpy(ex["loss"]), tokens, -100)
        mask[r, :n] = 1
    pixels = [ex["pixels"] for ex in examples if ex["pixels"] is not None]
    return dict(input_ids=input_ids, labels=labels, attention_mask=mask,
                pixel_values=torch.from_numpy(np.concatenate(pixels)) if pixels else None)


def torch_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    with open(os.path.join(a.work, "data", "data.json")) as f:
        records = json.load(f)
    saved = np.load(os.path.join(a.work, "examples.npz"))
    examples = [dict(tokens=saved[f"tokens_{r['id']}"], loss=saved[f"loss_{r['id']}"],
                     pixels=saved[f"pixels_{r['id']}"] if "image" in r else None) for r in records]
    torch.manual_seed(a.seed)
    order = modality_grouped(modality_lengths(records), a.hf_batch, a.hf_world)
    batches = [padded_batch([examples[i] for i in order[k:k + a.hf_batch]], int(saved["pad_id"]))
               for k in range(0, len(order), a.hf_batch)]
    model = peer.hf_model(a).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peer.LR, weight_decay=0.0)

    def step(k: str) -> dict:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batches[int(k)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {"s": time.perf_counter() - start, "loss": float(loss.detach())}

    computed = sum(b["input_ids"].numel() for b in batches)
    peer.serve(lambda: {"steps": len(batches), "computed_tokens": computed}, {"step": step})


# -- vlm_jax ---------------------------------------------------------------------------------------------------

def vlm_batches(config, tokenizer, count: int) -> list[dict]:
    """The training batches of one epoch of the `count` examples, as the trainer's iterator packs them."""
    from vlm_jax.data.pipeline import make_train_iterator

    it, batches, packed = make_train_iterator(config, tokenizer), [], 0
    try:
        while packed < count:
            batches.append(next(it))
            packed += int(batches[-1]["segment_ids"].max(axis=1).sum())  # segments restart at 1 in every row
    finally:
        it.close()
    return batches


def jax_worker(a: argparse.Namespace) -> None:
    """Builds vlm_jax's batches and writes its tokenised examples (`examples.npz`) for the transformers worker."""
    import jax

    from bench.train_step import vlm_state
    from vlm_jax import parallel
    from vlm_jax.data.conversation import VICUNA_V1_SYSTEM
    from vlm_jax.data.pipeline import BadRecord, make_example_dataset
    from vlm_jax.data.tokenizer import load_tokenizer

    setup, state, train_step = vlm_state(a, os.path.join(a.work, "vlm_jax"))
    # The model, optimizer and step are built; the data keys only say how the pipeline reads this dataset.
    config = setup.config
    config.data.update(source="llava_json", path=os.path.join(a.work, "data", "data.json"),
                       tokenizer=os.path.join(a.work, "tokenizer"), template="vicuna_v1", system=VICUNA_V1_SYSTEM,
                       image_processor="config", image_resize="shortest_edge_crop", image_pad_square=True,
                       max_tiles_per_row=a.tiles_per_row, pack_window=a.pack_window, epochs=1)
    tokenizer = load_tokenizer(config.data.tokenizer)
    examples = make_example_dataset(config, tokenizer)
    arrays, tokens, images = {"pad_id": np.int32(tokenizer.pad_token_id)}, 0, 0
    for i in range(len(examples)):  # one epoch: each record once
        ex = examples[i]
        if isinstance(ex, BadRecord):
            raise ex.error
        arrays.update({f"tokens_{ex.id}": ex.tokens, f"loss_{ex.id}": ex.loss,
                       f"pixels_{ex.id}": ex.tiles.transpose(0, 3, 1, 2)})
        tokens, images = tokens + len(ex), images + len(ex.tiles)
    np.savez(os.path.join(a.work, "examples.npz"), **arrays)
    host = vlm_batches(config, tokenizer, len(examples))
    packed = sum(int((b["segment_ids"] > 0).sum()) for b in host)
    if packed != tokens:
        raise RuntimeError(f"vlm_jax's batches hold {packed} example tokens, its examples {tokens}")
    holder = {"state": state}

    def step(k: str) -> dict:
        start = time.perf_counter()
        state, metrics = train_step(holder["state"], parallel.global_batch(host[int(k)], setup.mesh))
        loss = float(metrics["loss"])  # waits for the step
        jax.block_until_ready(state)
        holder["state"] = state
        return {"s": time.perf_counter() - start, "loss": loss}

    rows = sum(len(b["tokens"]) for b in host)
    peer.serve(lambda: {"steps": len(host), "tokens": tokens, "images": images, "computed_tokens": rows * a.seq_len,
                        "tile_slots": rows * a.tiles_per_row}, {"step": step})


# -- the run ---------------------------------------------------------------------------------------------------

def timed_pass(workers: dict, steps: dict[str, int], rounds: int, first: str) -> dict[str, float]:
    """Seconds of every step of each worker, its steps cut into `rounds` chunks run in turn, `first` leading the
    first round and the lead swapping every round."""
    chunks = {name: np.array_split(np.arange(n), rounds) for name, n in steps.items()}
    seconds = dict.fromkeys(workers, 0.0)
    order = [first, *(name for name in workers if name != first)]
    for r in range(rounds):
        for name in order:
            for k in chunks[name][r]:
                seconds[name] += workers[name].call(f"step {k}")["s"]
        order.reverse()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peer.add_size_flags(p)
    p.add_argument("--examples", type=int, default=96, help="conversations drawn from the mix")
    p.add_argument("--seq_len", type=int, default=2048, help="vlm_jax's row; the longest example (LLaVA's "
                                                             "model_max_length)")
    p.add_argument("--hf_batch", type=int, default=8, help="examples of a transformers batch")
    p.add_argument("--hf_world", type=int, default=1, help="LLaVA's world_size x gradient_accumulation_steps, the "
                                                           "sampler's megabatches of that many batches")
    p.add_argument("--batch", type=int, default=0, help="vlm_jax's rows a step; 0: the rows the tokens of "
                                                        "--hf_batch examples fill on average")
    p.add_argument("--tiles_per_row", type=int, default=4, help="vlm_jax's data.max_tiles_per_row")
    p.add_argument("--pack_window", type=int, default=1024, help="vlm_jax's data.pack_window")
    p.add_argument("--rounds", type=int, default=4, help="chunks of each side's steps, run in turn")
    p.add_argument("--passes", type=int, default=1, help="timed passes over all the examples; medians reported")
    p.add_argument("--seed", type=int, default=0, help="the examples and LLaVA's sampler")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        {"jax": jax_worker, "torch": torch_worker}[a.worker](a)
        return
    if peer.image_tokens(a) >= a.seq_len:
        raise SystemExit(f"--seq_len {a.seq_len} leaves no text beside an image's {peer.image_tokens(a)} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        peer.write_hf(a, hf_dir)
        words = tokenizer_words(a, os.path.join(tmp, "tokenizer"))
        lengths = write_dataset(a, os.path.join(tmp, "data"), words,
                                conversation_encoder(a, os.path.join(tmp, "tokenizer")))
        rows = a.batch or max(1, round(a.hf_batch * float(np.mean(lengths)) / a.seq_len))
        argv = [*peer.size_argv(a), f"--seq_len={a.seq_len}", f"--batch={rows}", f"--hf_batch={a.hf_batch}",
                f"--hf_world={a.hf_world}", f"--tiles_per_row={a.tiles_per_row}", f"--pack_window={a.pack_window}",
                f"--seed={a.seed}", "--hf_dir", hf_dir, "--work", tmp]
        workers = {"jax": peer.Worker(__file__, ["--worker", "jax", *argv])}  # writes the examples torch reads
        workers["torch"] = peer.Worker(__file__, ["--worker", "torch", *argv])
        steps = {name: w.ready["steps"] for name, w in workers.items()}
        for w in workers.values():
            w.call("step 0")  # warm-up: vlm_jax compiles
        passes = [timed_pass(workers, steps, min(a.rounds, *steps.values()), ("jax", "torch")[k % 2])
                  for k in range(a.passes)]
        rss = {name: w.close()["peak_rss_gib"] for name, w in workers.items()}
    jax_info, torch_info = workers["jax"].ready, workers["torch"].ready
    tokens, n = jax_info["tokens"], len(lengths)
    s = {name: statistics.median([t[name] for t in passes]) for name in workers}
    out = dict(
        examples_per_s_vlm_jax=n / s["jax"], examples_per_s_hf=n / s["torch"],
        examples_per_s_ratio_vs_hf=s["torch"] / s["jax"],
        tokens_per_s_vlm_jax=tokens / s["jax"], tokens_per_s_hf=tokens / s["torch"],
        padding_fraction_vlm_jax=1 - tokens / jax_info["computed_tokens"],
        padding_fraction_hf=1 - tokens / torch_info["computed_tokens"],
        vision_padding_fraction_vlm_jax=1 - jax_info["images"] / jax_info["tile_slots"],
        pass_s_vlm_jax=s["jax"], pass_s_hf=s["torch"], steps_vlm_jax=steps["jax"], steps_hf=steps["torch"],
        rows_per_step_vlm_jax=rows, hf_batch=a.hf_batch, hf_world=a.hf_world, examples=n,
        text_only_examples=n - jax_info["images"], mean_tokens=tokens / n, seq_len=a.seq_len,
        tiles_per_row=a.tiles_per_row, pack_window=a.pack_window, passes=a.passes,
        peak_rss_gib_vlm_jax=rss["jax"], peak_rss_gib_hf=rss["torch"], host_cpus=os.cpu_count())
    print(json.dumps(peer.rounded(out)))


if __name__ == "__main__":
    main()
