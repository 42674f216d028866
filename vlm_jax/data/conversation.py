"""Chat templates as data, and conversation -> (token ids, loss mask) built as each original trainer built them.

A conversation is a list of (role, text) turns, role "human" or "gpt", starting with human and
alternating. An `<image>` marker in a human turn becomes a run of placeholder ids whose length the
caller gives per image. Three constructions, chosen by the template (docs/contracts.md, "Tokens"):

- LLaVA (`plain`, `vicuna_v1`): LLaVA's train.py. A turn holding an image's marker is rewritten to
  "<image>\\n" + its stripped text (preprocess_multimodal; with several images LLaVA-NeXT's rule, `place_markers`);
  the prompt string (conv.get_prompt()) is split on "<image>" and each chunk tokenised whole, bos once
  (tokenizer_image_token); the loss mask comes from the lengths of separately tokenised rounds and instructions
  (preprocess_v1, preprocess_plain) with their quirks. Each image's single placeholder id of LLaVA is expanded into
  its run.
- Whole text (ChatML: `chatml`, `qwen2_vl`, `qwen_vl`): the text between placeholder runs is tokenised
  as one string, as `apply_chat_template` renders and tokenises it; a token carries loss when it overlaps
  an answer or its end piece (character offsets), for `qwen_vl` also every turn's "<|im_start|>" and
  "<|im_end|>\\n", as Qwen-VL's finetune.py labels them.
- Pieces (`xverse`, `ziya`): each template piece tokenised on its own and concatenated, as XVERSE-V's
  MiniGPT-4-style trainer tokenises questions and answers apart; the mask is exact by construction.
"""

import dataclasses
import re

import numpy as np

from vlm_jax.errors import BadRecordError

IMAGE_MARKER = "<image>"
HUMAN, GPT = "human", "gpt"
PIECES, WHOLE, LLAVA = "pieces", "whole", "llava"
# conv_vicuna_v1's system text (LLaVA's and ShareGPT4V's conversation.py, selected by `--version v1`).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Template:
    """One chat format, given by its pieces.

    system: format of the system prefix ("{system}" is the configured text); skipped when that text
        is empty (LLaVA's get_prompt would leave the lone separator " " there).
    user: a human turn up to and including the assistant prefix ("{q}" is the human text).
    answer: the assistant text ("{a}"); carries loss.
    end: end-of-turn text; None means the tokenizer's eos (an id, or for LLAVA its text, as LLaVA's sep2
        "</s>"). Carries loss, and its last id is the generation stop id.
    after_end: text after the end token (no loss unless label_turn_marks).
    keep_question: False drops the human text and keeps only its image markers (LLaVA "plain").
    single_turn: only one human/gpt exchange allowed.
    image_before, image_after: text around each image's placeholder run ("{k}" is the image's 1-based number
        in the conversation), e.g. Qwen-VL's "Picture 1: <img>" ... "</img>".
    build: PIECES, WHOLE or LLAVA (module docstring).
    label_turn_marks: WHOLE only: every turn's "<|im_start|>", and its end + after_end, carry loss too, in system
        and user turns as well (Qwen-VL's finetune.py labels them).
    image_prefix: PIECES / WHOLE only: every image's run (with image_before / image_after) forms the prompt's prefix,
        before bos, in image order; each human turn holding markers loses them and is stripped (BLIP-2's query
        tokens stand before the text, as transformers' Blip2Processor puts them).
    """

    name: str
    bos: bool
    system: str
    user: str
    answer: str
    end: str | None
    after_end: str = ""
    keep_question: bool = True
    single_turn: bool = False
    image_before: str = ""
    image_after: str = ""
    build: str = PIECES
    label_turn_marks: bool = False
    image_prefix: bool = False


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # LLaVA stage 1 (preprocess_plain): bos + image + caption + "\n" (docs/architectures.md 5.4).
    Template("plain", bos=True, system="", user="{q}", answer="{a}", end="\n",
             keep_question=False, single_turn=True, build=LLAVA),
    # LLaVA-1.5 / ShareGPT4V conv_vicuna_v1 (5.4): "{system} USER: {q} ASSISTANT: {a}</s>USER: ...". Its system
    # text (configs/sharegpt4v_7b.py) says "curious user" and "the user's questions"; the "human" wording is
    # conv_llava_v1's, which `--version v1` does not select.
    Template("vicuna_v1", bos=True, system="{system} ", user="USER: {q} ASSISTANT:", answer=" {a}",
             end=None, build=LLAVA),
    # XVERSE-V CONV_VISION_XVERSE (1.6): the end token <|endoftext|> is the tokenizer's eos.
    Template("xverse", bos=True, system="{system}\n", user="Human: {q}\nAssistant: ", answer="{a}",
             end=None),
    # Qwen ChatML.
    Template("chatml", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n", build=WHOLE),
    # Ziya-LLaMA / Ziya-BLIP2 (docs/architectures.md 3.5): "<human>:{q}\n<bot>:{a}\n" per exchange. Its chat()
    # history has no end token; training needs one for generation to stop, so the answer ends with eos
    # (unverified until Ziya's SFT data format is read). Each image is one 32-slot run of query vectors before
    # the text, bos included, where transformers' Blip2Processor puts them.
    Template("ziya", bos=True, system="{system}\n", user="<human>:{q}\n<bot>:", answer="{a}", end=None,
             after_end="\n", image_prefix=True),
    # Qwen2-VL / POINTS1.5 (docs/architectures.md 2.6): ChatML, images "<|vision_start|>" + slots + "<|vision_end|>";
    # the "\n" POINTS writes after it is the one LLaVA-format data already has after its <image> marker. POINTS
    # has no system message (leave data.system empty); Qwen2-VL's is "You are a helpful assistant."
    Template("qwen2_vl", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n", image_before="<|vision_start|>", image_after="<|vision_end|>",
             build=WHOLE),
    # Qwen-VL / Belle-VL (docs/architectures.md 4.4): ChatML, each image "Picture k: <img>" + 256 slots + "</img>"
    # (the released tokenizer's <img>/</img> specials 151857/151858; the slots stand where its path bytes
    # and <imgpad> padding were). The released system text is "You are a helpful assistant." Labels as Qwen-VL's
    # finetune.py sets them (docs/contracts.md, "Tokens").
    Template("qwen_vl", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n", image_before="Picture {k}: <img>", image_after="</img>",
             build=WHOLE, label_turn_marks=True),
)}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown data.template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """tokens: int32 [n]; loss: bool [n], True on tokens the model must predict (answer + end);
    image_starts: where each image's placeholder run starts in tokens, in image order."""

    tokens: np.ndarray
    loss: np.ndarray
    image_starts: tuple[int, ...]


def _image_first(text: str) -> str:
    """LLaVA's preprocess_multimodal: the marker moves to the front of its turn, then a newline and the
    stripped rest."""
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def place_markers(turns, n_images: int) -> list[tuple[str, str]]:
    """`turns` with their `<image>` markers where LLaVA's preprocess_multimodal puts them, so that prompts match
    what released checkpoints were trained on. With one image (LLaVA-1.5, ShareGPT4V) every turn holding a marker
    becomes "<image>\n" + its stripped text. With several (LLaVA-NeXT / OneVision's preprocess_multimodal) only a
    turn holding exactly one marker, not already at its start, is rewritten so; a turn of several markers keeps
    them where they stand, interleaved with its text."""
    def placed(text: str) -> str:
        count = text.count(IMAGE_MARKER)
        if n_images == 0:  # a text-only record's stray marker is left for the encoder to refuse
            return text
        if n_images == 1:
            return _image_first(text) if count else text
        return _image_first(text) if count == 1 and not text.startswith(IMAGE_MARKER) else text
    return [(role, placed(text)) for role, text in turns]


class ConversationEncoder:
    """Binds a template to a tokenizer, its special ids and the configured system text."""

    def __init__(self, template: Template, tokenizer, image_id: int, bos_id: int | None, eos_id: int,
                 system: str = ""):
        self.template, self.tokenizer, self.image_id = template, tokenizer, image_id
        self._bos = [bos_id] if template.bos and bos_id is not None else []
        self._system_text = system
        self._system = template.system.format(system=system) if system else ""
        self._end = [eos_id] if template.end is None else self._ids(template.end)
        if not self._end:
            raise ValueError(f"template {template.name!r}: end piece {template.end!r} tokenises to nothing")
        if template.build == WHOLE and not tokenizer.is_fast:
            raise ValueError(f"template {template.name!r} needs character offsets, which tokenizer "
                             f"{tokenizer.name_or_path!r} (not tokenizers-backed) does not give")
        if template.image_prefix and template.build == LLAVA:
            raise ValueError(f"template {template.name!r}: image_prefix takes a {PIECES!r} or {WHOLE!r} build")
        if template.build == LLAVA:
            if not self._bos:
                raise ValueError(f"template {template.name!r}: LLaVA's loss mask counts a bos token, and tokenizer "
                                 f"{tokenizer.name_or_path!r} has none")
            # LLaVA writes sep2 "</s>" as text into the prompt and splits rounds on it.
            self._eos_text = tokenizer.convert_ids_to_tokens(eos_id)
            if self._ids(self._eos_text) != [eos_id]:
                raise ValueError(f"template {template.name!r}: the eos text {self._eos_text!r} of tokenizer "
                                 f"{tokenizer.name_or_path!r} does not tokenise to its eos id {eos_id}")
            # " ASSISTANT: ": what preprocess_v1 splits each round on (conv.sep + roles[1] + ": ").
            self._instruction_end = template.user.split("{q}")[1] + template.answer.split("{a}")[0]

    @property
    def stop_id(self) -> int:
        """The id that ends an assistant turn: generation stops when it is produced."""
        return self._end[-1]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _check(self, turns, n_images: int, example_id: str) -> None:
        where = f"example {example_id}"
        if not turns:
            raise BadRecordError("empty conversation", where)
        for i, (role, text) in enumerate(turns):
            want = HUMAN if i % 2 == 0 else GPT
            if role != want:
                raise BadRecordError(f"turn {i} has role {role!r}, expected {want!r} (turns must start with "
                                     f"{HUMAN!r} and alternate with {GPT!r})", where)
            if not isinstance(text, str):
                raise BadRecordError(f"turn {i} text is {type(text).__name__}, not str", where)
            if role == GPT and IMAGE_MARKER in text:
                raise BadRecordError(f"{IMAGE_MARKER} marker in a {GPT!r} turn", where)
        if self.template.single_turn and len(turns) > 2:
            raise BadRecordError(f"template {self.template.name!r} takes one exchange, got {len(turns)} turns",
                                 where)
        markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
        if markers != n_images:
            raise BadRecordError(f"{markers} {IMAGE_MARKER} markers but {n_images} images", where)
        if not self.template.keep_question and n_images != 1:
            raise BadRecordError(f"template {self.template.name!r} takes exactly one image (LLaVA's "
                                 f"preprocess_plain), got {n_images}", where)

    # ---- LLaVA: llava/mm_utils.py tokenizer_image_token, llava/train/train.py preprocess_v1 / preprocess_plain

    def _llava_tokens(self, text: str) -> list[int | None]:
        """tokenizer_image_token: bos, then each chunk between "<image>" markers tokenised whole; None stands
        for LLaVA's single IMAGE_TOKEN_INDEX of each image."""
        out: list[int | None] = list(self._bos)
        for k, chunk in enumerate(text.split(IMAGE_MARKER)):
            if k:
                out.append(None)
            out += self._ids(chunk)
        return out

    def _llava_v1_loss(self, prompt: str, n_tokens: int, example_id: str, complete: bool) -> np.ndarray:
        """preprocess_v1's mask, from the lengths of each "</s>"-separated round and of its instruction
        (through " ASSISTANT: ") tokenised on their own."""
        loss = np.ones(n_tokens, bool)
        cur = len(self._bos)
        loss[:cur] = False
        # LLaVA's adjustment for non-legacy tokenizers (tokenizers >= 0.14), whose text right after "</s>" gets
        # no prefix space: it assumes each later round is then one token shorter than tokenised alone.
        # Tokenizers without the attribute (byte-level BPE) have no prefix space to lose.
        non_legacy = not getattr(self.tokenizer, "legacy", True)
        for i, rou in enumerate(prompt.split(self._eos_text)):
            parts = rou.split(self._instruction_end)
            if rou == "" or len(parts) != 2:
                break
            # The round's own bos stands in for its "</s>". "- 2" drops the bos and the lone prefix-space token
            # that the instruction's trailing space makes alone; in the round it merges into the answer's
            # first token. Answers starting with a space keep that quirk's consequences, as in LLaVA.
            round_len = len(self._llava_tokens(rou))
            instruction_len = len(self._llava_tokens(parts[0] + self._instruction_end)) - 2
            if i and non_legacy:
                round_len, instruction_len = round_len - 1, instruction_len - 1
            loss[cur:cur + instruction_len] = False
            cur += round_len
        loss[cur:] = False
        # LLaVA sets the whole target to IGNORE here and prints "tokenization mismatch"; a silently unlearned
        # example hides a tokenizer or data problem, so vlm_jax stops on it.
        if complete and cur != n_tokens:
            raise BadRecordError(f"tokenization mismatch: LLaVA's round lengths cover {cur} tokens, the "
                                 f"conversation has {n_tokens} (an answer or question holding {self._eos_text!r} "
                                 f"or {self._instruction_end!r}, or a tokenizer whose `legacy` setting does not fit "
                                 "LLaVA's adjustment)", f"example {example_id}")
        return loss

    def _llava(self, turns, image_lengths, answer_last: bool, example_id: str) -> Encoded:
        t = self.template
        texts = [text for _, text in place_markers(turns, len(image_lengths))]
        if not t.keep_question:
            # preprocess_plain: the human turn becomes "<image>"; the mask hides what that alone tokenises to.
            prompt = IMAGE_MARKER + (texts[1] + t.end if answer_last and len(texts) == 2 else "")
            ids = self._llava_tokens(prompt)
            loss = np.zeros(len(ids), bool)
            loss[len(self._llava_tokens(IMAGE_MARKER)):] = True
        else:
            prompt = self._system
            for i in range(0, len(texts), 2):
                prompt += t.user.format(q=texts[i])
                if i + 1 < len(texts) and (answer_last or i + 2 < len(texts)):
                    prompt += t.answer.format(a=texts[i + 1]) + self._eos_text
            ids = self._llava_tokens(prompt)
            loss = self._llava_v1_loss(prompt, len(ids), example_id, complete=answer_last)
        # Our placeholder run is the expansion of LLaVA's single image id; the model ignores its labels.
        out: list[tuple[list[int], bool, bool]] = []
        k = 0
        for token, flag in zip(ids, loss.tolist()):
            if token is None:
                out.append(([self.image_id] * image_lengths[k], False, True))
                k += 1
            else:
                out.append(([token], flag, False))
        return _flatten(out)

    # ---- ChatML and piecewise templates

    def _parts(self, fmt: str, **values: str) -> list[tuple[str, bool]]:
        """A system or user piece formatted, as (text, loss) parts; with label_turn_marks the template's own
        "<|im_start|>" and end + after_end are parts that carry loss."""
        t = self.template
        if not t.label_turn_marks:
            return [(fmt.format(**values), False)]
        marks = ("<|im_start|>", t.end + t.after_end)
        pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", fmt)
        return [(p if p in marks else p.format(**values), p in marks) for p in pieces if p]

    def _items(self, turns, image_lengths, answer_last: bool) -> list[tuple[str | list[int], bool, bool]]:
        """The conversation in order as (text or ids, loss, is an image run)."""
        t = self.template
        end = self._end if t.end is None else t.end
        out: list[tuple[str | list[int], bool, bool]] = []
        n_images = 0

        def image_run() -> None:
            nonlocal n_images
            n_images += 1
            out.append((t.image_before.format(k=n_images), False, False))
            out.append(([self.image_id] * image_lengths[n_images - 1], False, True))
            out.append((t.image_after.format(k=n_images), False, False))

        if t.image_prefix:
            for _ in image_lengths:
                image_run()
        out.append((self._bos, False, False))
        if self._system_text:
            out += [(text, flag, False) for text, flag in self._parts(t.system, system=self._system_text)]
        for i in range(0, len(turns), 2):
            question = turns[i][1]
            if t.image_prefix and IMAGE_MARKER in question:
                question = question.replace(IMAGE_MARKER, "").strip()
            for text, flag in self._parts(t.user, q=question):
                for k, segment in enumerate(text.split(IMAGE_MARKER)):
                    if k:
                        image_run()
                    out.append((segment, flag, False))
            if i + 1 < len(turns) and (answer_last or i + 2 < len(turns)):
                out += [(t.answer.format(a=turns[i + 1][1]), True, False), (end, True, False),
                        (t.after_end, t.label_turn_marks, False)]
        return out

    def _whole_text(self, parts: list[tuple[str, bool]]) -> list[tuple[list[int], bool, bool]]:
        """One string tokenised whole; a token carries loss when its characters overlap a loss part's."""
        text = "".join(piece for piece, _ in parts)
        if not text:
            return []
        spans, pos = [], 0
        for piece, flag in parts:
            if flag:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [([token], any(a < max(e, s + 1) and s < b for a, b in spans), False)
                for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]

    def _assemble(self, turns, image_lengths, answer_last: bool, example_id: str) -> Encoded:
        if self.template.build == LLAVA:
            return self._llava(turns, image_lengths, answer_last, example_id)
        items = self._items(turns, image_lengths, answer_last)
        if self.template.build == PIECES:
            return _flatten([(self._ids(x) if isinstance(x, str) else x, flag, image) for x, flag, image in items])
        out, text = [], []
        for x, flag, image in items:
            if isinstance(x, str):
                text.append((x, flag))
                continue
            out += self._whole_text(text)
            text = []
            out.append((x, flag, image))
        return _flatten(out + self._whole_text(text))

    def encode(self, turns, image_lengths: list[int], example_id: str) -> Encoded:
        """Training form: every turn, answers and end tokens marked for loss.

        image_lengths[k] is the placeholder run length of the k-th image (in marker order)."""
        self._check(turns, len(image_lengths), example_id)
        if len(turns) % 2:
            raise BadRecordError(f"conversation ends with a {HUMAN!r} turn, no answer to train on",
                                 f"example {example_id}")
        return self._assemble(turns, image_lengths, True, example_id)

    def encode_prompt(self, turns, image_lengths: list[int], example_id: str) -> tuple[Encoded, str | None]:
        """Generation form: all turns through the assistant prefix of the last exchange, no answer.

        Returns (encoded prompt, reference answer); the answer is the final gpt turn's text, or None
        when the conversation ends with a human turn."""
        self._check(turns, len(image_lengths), example_id)
        answer = turns[-1][1] if len(turns) % 2 == 0 else None
        return self._assemble(turns, image_lengths, False, example_id), answer


def _flatten(items: list[tuple[list[int], bool, bool]]) -> Encoded:
    """(ids, loss, is an image run) items -> Encoded."""
    tokens = np.fromiter((t for ids, _, _ in items for t in ids), np.int32)
    loss = np.fromiter((flag for ids, flag, _ in items for _ in ids), bool, count=len(tokens))
    starts, pos = [], 0
    for ids, _, image in items:
        if image:
            starts.append(pos)
        pos += len(ids)
    return Encoded(tokens, loss, tuple(starts))
