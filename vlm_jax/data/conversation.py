"""Chat templates as data, and conversation -> (token ids, loss mask) by piecewise tokenisation.

A conversation is a list of (role, text) turns, role "human" or "gpt", starting with human and
alternating. Each template piece is tokenised once on its own (no special tokens added) and the
pieces are concatenated, so the loss mask is exact by construction: it covers the assistant
answer piece and its end-of-turn piece, nothing else. An `<image>` marker in a human turn becomes
a run of placeholder ids whose length the caller gives per image.

Piecewise tokenisation equals whole-string tokenisation at piece boundaries for byte-level BPE
tokenizers (the demo tokenizer, Qwen); SentencePiece tokenizers (LLaMA/Vicuna) may differ there
by a prefix-space token. Training and generation prompts use the same pieces, so they agree.
"""

import dataclasses

import numpy as np

IMAGE_MARKER = "<image>"
HUMAN, GPT = "human", "gpt"


@dataclasses.dataclass(frozen=True)
class Template:
    """One chat format, given by its pieces.

    system: format of the system prefix ("{system}" is the configured text); skipped when that text
        is empty.
    user: a human turn up to and including the assistant prefix ("{q}" is the human text).
    answer: the assistant text ("{a}"); carries loss.
    end: end-of-turn text, tokenised as a piece; None means the tokenizer's eos id. Carries loss, and
        its last id is the generation stop id.
    after_end: text after the end token (no loss).
    keep_question: False drops the human text and keeps only its image markers (LLaVA "plain").
    single_turn: only one human/gpt exchange allowed.
    image_before, image_after: text around each image's placeholder run ("{k}" is the image's 1-based number
        in the conversation), e.g. Qwen-VL's "Picture 1: <img>" ... "</img>".
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


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # LLaVA stage 1: bos + image + caption + "\n" (docs/architectures.md 5.4).
    Template("plain", bos=True, system="", user="{q}", answer="{a}", end="\n",
             keep_question=False, single_turn=True),
    # LLaVA-1.5 / ShareGPT4V conv_vicuna_v1 (5.4); the released system text is "A chat between a curious
    # user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite
    # answers to the user's questions."
    Template("vicuna_v1", bos=True, system="{system} ", user="USER: {q} ASSISTANT:", answer=" {a}",
             end=None),
    # XVERSE-V CONV_VISION_XVERSE (1.6): the end token <|endoftext|> is the tokenizer's eos.
    Template("xverse", bos=True, system="{system}\n", user="Human: {q}\nAssistant: ", answer="{a}",
             end=None),
    # Qwen ChatML.
    Template("chatml", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n"),
    # Ziya-LLaMA / Ziya-BLIP2 (docs/architectures.md 3.5): "<human>:{q}\n<bot>:{a}\n" per exchange. Its chat()
    # history has no end token; training needs one for generation to stop, so the answer ends with eos
    # (unverified until Ziya's SFT data format is read). Each image is one 32-slot run where its marker stands.
    Template("ziya", bos=True, system="{system}\n", user="<human>:{q}\n<bot>:", answer="{a}", end=None,
             after_end="\n"),
    # Qwen2-VL / POINTS1.5 (docs/architectures.md 2.6): ChatML, images "<|vision_start|>" + slots + "<|vision_end|>";
    # the "\n" POINTS writes after it is the one LLaVA-format data already has after its <image> marker. POINTS
    # has no system message (leave data.system empty); Qwen2-VL's is "You are a helpful assistant."
    Template("qwen2_vl", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n", image_before="<|vision_start|>", image_after="<|vision_end|>"),
    # Qwen-VL / Belle-VL (docs/architectures.md 4.4): ChatML, each image "Picture k: <img>" + 256 slots + "</img>"
    # (the released tokenizer's <img>/</img> specials 151857/151858; the slots stand where its path bytes
    # and <imgpad> padding were). The released system text is "You are a helpful assistant."
    Template("qwen_vl", bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
             user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", answer="{a}",
             end="<|im_end|>", after_end="\n", image_before="Picture {k}: <img>", image_after="</img>"),
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


class ConversationEncoder:
    """Binds a template to a tokenizer, its special ids and the configured system text."""

    def __init__(self, template: Template, tokenizer, image_id: int, bos_id: int | None, eos_id: int,
                 system: str = ""):
        self.template, self.tokenizer, self.image_id = template, tokenizer, image_id
        self._bos = [bos_id] if template.bos and bos_id is not None else []
        self._system = self._ids(template.system.format(system=system)) if system else []
        self._end = [eos_id] if template.end is None else self._ids(template.end)
        if not self._end:
            raise ValueError(f"template {template.name!r}: end piece {template.end!r} tokenises to nothing")
        self._after_end = self._ids(template.after_end)

    @property
    def stop_id(self) -> int:
        """The id that ends an assistant turn: generation stops when it is produced."""
        return self._end[-1]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _check(self, turns, n_images: int, example_id: str) -> None:
        if not turns:
            raise ValueError(f"example {example_id}: empty conversation")
        for i, (role, text) in enumerate(turns):
            want = HUMAN if i % 2 == 0 else GPT
            if role != want:
                raise ValueError(f"example {example_id}: turn {i} has role {role!r}, expected {want!r} "
                                 f"(turns must start with {HUMAN!r} and alternate with {GPT!r})")
            if not isinstance(text, str):
                raise ValueError(f"example {example_id}: turn {i} text is {type(text).__name__}, not str")
            if role == GPT and IMAGE_MARKER in text:
                raise ValueError(f"example {example_id}: {IMAGE_MARKER} marker in a {GPT!r} turn")
        if self.template.single_turn and len(turns) > 2:
            raise ValueError(f"example {example_id}: template {self.template.name!r} takes one exchange, "
                             f"got {len(turns)} turns")
        markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
        if markers != n_images:
            raise ValueError(f"example {example_id}: {markers} {IMAGE_MARKER} markers but {n_images} images")

    def _human(self, text: str, image_lengths, out: list, starts: list) -> None:
        if not self.template.keep_question:
            text = IMAGE_MARKER * text.count(IMAGE_MARKER)
        segments = self.template.user.format(q=text).split(IMAGE_MARKER)
        for k, segment in enumerate(segments):
            if k:
                number = len(starts) + 1
                out.append((self._ids(self.template.image_before.format(k=number)), False))
                starts.append(sum(len(ids) for ids, _ in out))
                out.append(([self.image_id] * image_lengths[number - 1], False))
                out.append((self._ids(self.template.image_after.format(k=number)), False))
            out.append((self._ids(segment), False))

    def _assemble(self, turns, image_lengths, answer_last: bool):
        out: list[tuple[list[int], bool]] = [(self._bos + self._system, False)]
        starts: list[int] = []
        for i in range(0, len(turns), 2):
            self._human(turns[i][1], image_lengths, out, starts)
            if i + 1 < len(turns) and (answer_last or i + 2 < len(turns)):
                out.append((self._ids(self.template.answer.format(a=turns[i + 1][1])), True))
                out.append((self._end, True))
                out.append((self._after_end, False))
        tokens = np.fromiter((t for ids, _ in out for t in ids), np.int32)
        loss = np.fromiter((flag for ids, flag in out for _ in ids), bool, count=len(tokens))
        return Encoded(tokens, loss, tuple(starts))

    def encode(self, turns, image_lengths: list[int], example_id: str) -> Encoded:
        """Training form: every turn, answers and end tokens marked for loss.

        image_lengths[k] is the placeholder run length of the k-th image (in marker order)."""
        self._check(turns, len(image_lengths), example_id)
        if len(turns) % 2:
            raise ValueError(f"example {example_id}: conversation ends with a {HUMAN!r} turn, no answer to "
                             f"train on")
        return self._assemble(turns, image_lengths, answer_last=True)

    def encode_prompt(self, turns, image_lengths: list[int], example_id: str) -> tuple[Encoded, str | None]:
        """Generation form: all turns through the assistant prefix of the last exchange, no answer.

        Returns (encoded prompt, reference answer); the answer is the final gpt turn's text, or None
        when the conversation ends with a human turn."""
        self._check(turns, len(image_lengths), example_id)
        answer = turns[-1][1] if len(turns) % 2 == 0 else None
        return self._assemble(turns, image_lengths, answer_last=False), answer
