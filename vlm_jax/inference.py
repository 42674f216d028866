"""A trained model ready to answer: its config, parameters, tokenizer, chat template and image preprocessing, taken
from the checkpoint itself, and batched generation over prompts built from conversations and images.

What is loaded (`Assistant.load`): a training `WORKDIR[@STEP]` answers with the config its run saved (template,
system text, image settings, mesh), the tokenizer its run recorded and the image processor its run used; a
checkpoint directory (an import or a soup) with the checkpoint's model, its recorded tokenizer and image processor,
and the conversation settings of its family (FAMILY_DATA: those of the original system). `--config FILE` replaces
the saved config but for the model; `--config.KEY=VALUE` overrides go on top of either.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from configs import base
from vlm_jax import image_inputs, parallel
from vlm_jax.checkpoints.directory import load_params, read_meta
from vlm_jax.checkpoints.workdir import is_workdir, open_workdir
from vlm_jax.config import load_config, set_key, upgrade_model_config
from vlm_jax.data.conversation import GPT, HUMAN, IMAGE_MARKER, VICUNA_V1_SYSTEM
from vlm_jax.data.image_processor import navit_pixel_bounds, recorded_folder
from vlm_jax.data.pipeline import PromptBuilder
from vlm_jax.data.records import make_encoder
from vlm_jax.data.tokenizer import recorded_tokenizer, run_tokenizer
from vlm_jax.errors import InputError
from vlm_jax.generate import generate, stop_sequences
from vlm_jax.model import VLM
from vlm_jax.params import unflat
from vlm_jax.sampling import Sampling

QWEN_SYSTEM = "You are a helpful assistant."
# The conversation settings of an imported checkpoint's family: the original system's chat format. A whole-image
# family answers on one view of the tower's image size (LLaVA-1.5, BLIP-2, Qwen-VL take no tiles).
FAMILY_DATA: dict[str, dict[str, Any]] = {
    "llava": dict(template="vicuna_v1", system=VICUNA_V1_SYSTEM, max_tiles=1),
    "llava_original": dict(template="vicuna_v1", system=VICUNA_V1_SYSTEM, max_tiles=1, image_token_id=-200),
    "qwen2_vl": dict(template="qwen2_vl", system=QWEN_SYSTEM),
    "points": dict(template="qwen2_vl", system=""),
    "points_qwen2": dict(template="qwen2_vl", system=""),
    "blip2": dict(template="ziya", system="", max_tiles=1),
    "qwen_vl": dict(template="qwen_vl", system=QWEN_SYSTEM, max_tiles=1),
}


def _import_config(source: str) -> ml_collections.ConfigDict:
    """base config with the checkpoint directory's model and its family's conversation settings."""
    meta = read_meta(source)
    family = meta.get("family")
    if family not in FAMILY_DATA:
        raise InputError(f"{source}: a {family!r} checkpoint has no known chat format (families with one: "
                         f"{sorted(FAMILY_DATA)}); pass --config FILE with its data settings")
    config = base.get_config()
    config.model = upgrade_model_config(meta["model"])
    config.data.update(FAMILY_DATA[family])
    if meta.get("image_token_index") is not None:  # the source's placeholder (Qwen2-VL's <|image_pad|>)
        config.data.image_token_id = meta["image_token_index"]
    folder = recorded_folder(source)
    if config.model.vision.stem != "navit":
        config.data.tile_size = config.model.vision.image_size
    elif folder and navit_pixel_bounds(folder):
        config.data.min_pixels, config.data.max_pixels = navit_pixel_bounds(folder)
    return config


def inference_config(source: str, config_file: str | None = None,
                     overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config to answer with from checkpoint `source` (module docstring): its own, or `config_file`'s with the
    checkpoint's model, then `overrides` (KEY=VALUE). The tokenizer and image processor recorded with `source` win
    over the saved data.tokenizer and data.image_processor (paths of the machine that trained it) unless
    overridden."""
    workdir = is_workdir(source)
    if config_file:
        config = load_config(config_file)
        config.model = open_workdir(source).config.model if workdir else upgrade_model_config(
            read_meta(source)["model"])
    else:
        config = open_workdir(source).config if workdir else _import_config(source)
    if recorded_tokenizer(source):
        config.data.tokenizer = ""
    if recorded_folder(source):
        config.data.image_processor = "auto"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"config override {item!r} must look like key=value")
        set_key(config, key, value)
    config.init_params = source  # run_tokenizer and the image processor read what is recorded with it
    return config


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's answer: the generated ids (through the stop sequence that ended it, if one did) and their
    text (special tokens skipped, cut before any stop string, stripped)."""

    tokens: list[int]
    text: str


class Assistant:
    """A model with its tokenizer, template and image preprocessing: prompts in, completions out."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer, mesh: jax.sharding.Mesh):
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.model = VLM(config.model)
        self.kind = image_inputs.make(config.model)
        self.builder = PromptBuilder(config, tokenizer)
        self.stop_id = make_encoder(config, tokenizer).stop_id
        self.step: int | None = None  # the workdir checkpoint's step, when loaded from one
        self._compiled: dict[tuple, Callable] = {}
        self._streamed: list[list[int]] = []  # a streaming generation's ids so far, and where they go
        self._on_tokens: Callable[[list[list[int]]], None] | None = None

    @classmethod
    def load(cls, source: str, config: ml_collections.ConfigDict | None = None) -> "Assistant":
        """The model of `WORKDIR[@STEP]` or a checkpoint directory with `config` (default: `inference_config`'s
        for it), on the config's mesh."""
        config = config or inference_config(source)
        mesh = parallel.make_mesh(config.mesh)
        params, _ = load_params(source, mesh)
        assistant = cls(config, unflat(params), run_tokenizer(config), mesh)
        assistant.step = open_workdir(source).step if is_workdir(source) else None
        return assistant

    def prompt(self, turns: Sequence[tuple[str, str]], images: Sequence[Image.Image] = (),
               prompt_id: str = "prompt") -> dict:
        """A generation prompt of `turns` ((role, text), roles "human" and "gpt" alternating from human, ending with
        the human turn to answer) and their `images`, in the order of the `<image>` markers in the human turns; with
        no marker anywhere the images go first in the first turn, each "<image>\n", as LLaVA's evaluation puts one."""
        turns = [tuple(t) for t in turns]
        if not turns or len(turns) % 2 == 0 or any(r != (HUMAN, GPT)[i % 2] for i, (r, _) in enumerate(turns)):
            raise InputError(f"prompt {prompt_id}: turns must alternate {HUMAN!r}, {GPT!r} from {HUMAN!r} and end "
                             f"with a {HUMAN!r} turn; got roles {[r for r, _ in turns]}")
        markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
        if markers == 0 and images:
            turns[0] = (HUMAN, f"{IMAGE_MARKER}\n" * len(images) + turns[0][1])
        elif markers != len(images):
            raise InputError(f"prompt {prompt_id}: {markers} {IMAGE_MARKER} markers for {len(images)} images")
        views = self.builder.to_example.images(dict(images=list(images)))
        return self.builder.build(turns, views, prompt_id)[0]

    def stop_ids(self, stop: Sequence[str]) -> np.ndarray:
        """int32 [S, K] (`generate.stop_sequences`): the template's end id, then each stop string's ids."""
        seqs = [[self.stop_id]] + [self.tokenizer.encode(s, add_special_tokens=False) for s in stop]
        if not all(seqs):
            raise InputError(f"stop strings {list(stop)}: each must tokenise to at least one id")
        return stop_sequences(seqs)

    def _generator(self, sampling: Sampling, max_new_tokens: int, streaming: bool) -> Callable:
        """The jitted generation of one setting; streaming ones send each step's tokens to `_emit`."""
        key = (sampling, max_new_tokens, streaming)
        if key not in self._compiled:
            def run(params, batch, stop, rng):
                return generate(self.model, params, batch["tokens"], batch["segment_ids"], batch["images"],
                                positions=batch["positions"], max_new_tokens=max_new_tokens, stop=stop,
                                sampling=sampling, rng=rng, on_token=self._emit if streaming else None)
            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def _emit(self, step: np.ndarray, tokens: np.ndarray) -> None:
        for ids, t in zip(self._streamed, np.asarray(tokens)):
            ids.append(int(t))
        self._on_tokens(self._streamed)

    def generate(self, prompts: Sequence[dict], *, max_new_tokens: int | None = None,
                 sampling: Sampling = Sampling(), seed: int = 0, stop: Sequence[str] = (),
                 on_tokens: Callable[[list[list[int]]], None] | None = None) -> list[Completion]:
        """Completions of `prompts` (`prompt`), config.eval_batch_size at a time (rounded up to the mesh's data
        parallelism). `sampling` greedy by default; `seed` makes a sampled run repeatable. `on_tokens`, given,
        is called after every decode step with each prompt's ids so far (one batch at a time): streaming."""
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        dp = parallel.data_parallel_size(self.mesh)
        rows = -(-min(len(prompts), self.config.eval_batch_size) // dp) * dp
        stop_rows = self.stop_ids(stop)
        run = self._generator(sampling, max_new_tokens, on_tokens is not None)
        sharding = parallel.batch_sharding(self.mesh)
        out: list[Completion] = []
        for start in range(0, len(prompts), rows):
            chunk = prompts[start:start + rows]
            batch = self.kind.pad_prompts(list(chunk), self.config, rows)
            batch = jax.device_put({k: batch[k] for k in ("tokens", "positions", "segment_ids")} |
                                   dict(images=self.kind.select(batch)), sharding)
            self._streamed, self._on_tokens = [[] for _ in chunk], on_tokens
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
            with jax.set_mesh(self.mesh):
                ids = np.asarray(jax.device_get(run(self.params, batch, stop_rows, rng)))
            if on_tokens is not None:
                jax.effects_barrier()  # the last steps' callbacks may still be running when the ids are back
            out += [self._completion(row.tolist(), stop_rows, stop) for row in ids[:len(chunk)]]
        return out

    def _completion(self, ids: list[int], stop_rows: np.ndarray, stop: Sequence[str]) -> Completion:
        """The ids through the first stop sequence they end at, and their text before it."""
        seqs = [list(s[s >= 0]) for s in stop_rows]
        end, kept = len(ids), len(ids)
        for i in range(1, len(ids) + 1):
            hit = next((s for s in seqs if ids[max(0, i - len(s)):i] == s), None)
            if hit is not None:
                end, kept = i, i - len(hit)
                break
        text = self.tokenizer.decode(ids[:kept], skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        return Completion(tokens=ids[:end], text=text.strip())
