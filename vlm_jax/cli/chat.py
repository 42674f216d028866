"""Talk to a trained model:
vlm-chat (--workdir W[@STEP] | --params CKPT_DIR) [--image IMG ...] ["question"]

The model's config, chat template, tokenizer and image preprocessing come from the checkpoint (a run's saved config,
or an import's family; vlm_jax/inference.py); --config FILE replaces that config but for the model, and
--config.KEY=VALUE overrides either (e.g. --config.data.system="...").

- With a question: its answer, printed as it decodes.
- Without one: an interactive chat on standard input, one human turn per line, the --image images going with the
  first turn; "/reset" starts a new conversation (same images), an empty line or the end of input ends it.
- --prompts FILE.jsonl: a batch, one JSON object a line, {"question": TEXT, "images": [PATH, ...]} or
  {"turns": [["human", TEXT], ["gpt", TEXT], ..., ["human", TEXT]], "images": [...]}; image paths are relative to the
  file's folder. Answers come in the file's order, config.eval_batch_size prompts at a time.
- --json: one JSON line per answer, {"tokens": [generated ids], "text": ...}, instead of the text.

Decoding is greedy unless --temperature > 0 (then --top_k, --top_p and --seed apply); --repetition_penalty works in
both; --stop TEXT (repeatable) ends an answer at that text, besides the template's end token.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

from PIL import Image

from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.data.conversation import GPT, HUMAN
from vlm_jax.data.images import load_image
from vlm_jax.errors import InputError
from vlm_jax.inference import Assistant, Completion, inference_config
from vlm_jax.sampling import Sampling


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--workdir W[@STEP] | --params DIR: the model a command answers with."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a training workdir, WORKDIR or WORKDIR@STEP (default: its latest step)")
    which.add_argument("--params", help="a checkpoint directory (vlm-convert import, vlm-soup)")


def _arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("question", nargs="?", default=None, help="ask this and exit (default: an interactive chat)")
    p.add_argument("--image", action="append", default=[], help="an image file for the question (repeatable)")
    p.add_argument("--prompts", default=None, help="a JSONL file of prompts to answer as a batch")
    p.add_argument("--json", action="store_true", help="print one JSON line per answer: tokens and text")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="end an answer at this text (repeatable)")


def _image(path: str, max_pixels: int) -> Image.Image:
    try:
        return load_image(path, max_pixels)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None


def _batch(path: str, max_pixels: int) -> list[tuple[list[tuple[str, str]], list[Image.Image]]]:
    """(turns, images) of each line of a --prompts file; a bad line is one error naming the file and line."""
    folder, out = os.path.dirname(os.path.abspath(path)), []
    if not os.path.isfile(path):
        raise InputError(f"--prompts file not found: {path}")
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                turns = [tuple(t) for t in item["turns"]] if "turns" in item else [(HUMAN, item["question"])]
                images = [_image(os.path.join(folder, p), max_pixels) for p in item.get("images", [])]
            except (json.JSONDecodeError, KeyError, TypeError, InputError) as e:
                raise InputError(f"{path} line {n}: {type(e).__name__}: {e}") from None
            out.append((turns, images))
    return out


class _Printer:
    """Prints one streamed answer's new text as its ids grow. Text that ends inside a multi-byte character (a
    replacement character at its end), or in what could be the start of a stop string, waits for the next id."""

    def __init__(self, assistant: Assistant, stop: list[str]):
        self.decode, self.stop, self.printed = assistant.tokenizer.decode, stop, ""
        self.end_ids = {int(i) for i in assistant.stop_ids(())[0]}

    def shown(self, text: str) -> str:
        for s in self.stop:
            text = text.split(s)[0]
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - held]

    def __call__(self, ids: list[list[int]]) -> None:
        row = ids[0]
        ends = [row.index(i) for i in self.end_ids if i in row]
        text = self.shown(self.decode(row[:min(ends, default=len(row))], skip_special_tokens=True).lstrip())
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def finish(self, completion: Completion) -> None:
        """The rest of the answer's text, and the line's end."""
        rest = completion.text[len(self.printed):] if completion.text.startswith(self.printed) else ""
        print(rest, flush=True)


def _answer(assistant: Assistant, turns, images, ask: Callable, stream: bool, stop: list[str]) -> Completion:
    printer = _Printer(assistant, stop) if stream else None
    [completion] = ask([assistant.prompt(turns, images)], on_tokens=printer)
    if printer:
        printer.finish(completion)
    return completion


def _interactive(assistant: Assistant, images: list[Image.Image], ask: Callable, as_json: bool,
                 stop: list[str]) -> None:
    turns: list[tuple[str, str]] = []
    while True:
        print("> " if sys.stdin.isatty() else "", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        if line.strip() == "/reset":
            turns = []
            continue
        turns.append((HUMAN, line.strip()))
        completion = _answer(assistant, turns, images, ask, not as_json, stop)  # the images stay in the first turn
        if as_json:
            print(json.dumps(dict(tokens=completion.tokens, text=completion.text)), flush=True)
        turns.append((GPT, completion.text))


def main(argv: list[str] | None = None) -> None:
    args, _ = parse(__doc__.splitlines()[0], argv, _arguments, workdir=False, config_optional=True)
    with reported_errors():
        source = args.workdir or args.params
        config = inference_config(source, args.config, args.overrides)
        max_pixels = config.data.max_image_pixels
        images = [_image(p, max_pixels) for p in args.image]
        batch = _batch(args.prompts, max_pixels) if args.prompts else []
        assistant = Assistant.load(source, config)
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)

        def ask(prompts: list[dict], on_tokens=None) -> list[Completion]:
            return assistant.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                      seed=args.seed, stop=args.stop, on_tokens=on_tokens)

        if args.prompts:
            completions = ask([assistant.prompt(t, im, f"{args.prompts}:{n}") for n, (t, im) in enumerate(batch, 1)])
            for c in completions:
                print(json.dumps(dict(tokens=c.tokens, text=c.text)) if args.json else c.text, flush=True)
        elif args.question is not None:
            completion = _answer(assistant, [(HUMAN, args.question)], images, ask, not args.json, args.stop)
            if args.json:
                print(json.dumps(dict(tokens=completion.tokens, text=completion.text)), flush=True)
        else:
            _interactive(assistant, images, ask, args.json, args.stop)


if __name__ == "__main__":
    main()
