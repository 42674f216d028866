"""Token ids and loss masks equal the released constructions (docs/contracts.md, "Tokens").

LLaVA / ShareGPT4V: a LLaMA-style SentencePiece tokenizer (BPE, byte fallback, dummy prefix, split digits, as
LLaMA's tokenizer.model is trained), wrapped as transformers' LlamaTokenizer in its legacy and non-legacy forms,
against a reference written here from llava/mm_utils.py (tokenizer_image_token) and llava/train/train.py
(preprocess_multimodal, preprocess_v1, preprocess_plain) and conv_vicuna_v1 of llava/conversation.py.
ChatML: a Qwen2-style byte-level BPE tokenizer with Qwen2-VL's chat template, against apply_chat_template.
"""

import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.helpers import ROOT
from vlm_jax.config import load_config
from vlm_jax.data.conversation import ConversationEncoder, get_template

IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100  # llava/constants.py
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")  # conv_vicuna_v1.system
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: What color is the star? ASSISTANT: The star is red.", "Describe the image in detail.",
          "There are 3 shapes: a blue circle, a green square and 12 red triangles.", "你好，世界！这是一张图片。",
          "Where is it? It is at the top left of the picture\n\nIt is small\n\nIt is red",
          "Hello world 123, <ok>"]
RUN = 5  # placeholder run length of every image


# ---- LLaMA-style SentencePiece tokenizer ------------------------------------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def llama_tok(request, tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    # LlamaTokenizer(vocab_file=...) is silently empty in transformers 5; a directory with tokenizer.model converts.
    path = tmp_path_factory.mktemp("llama_tok")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", legacy=request.param, add_bos_token=True, add_eos_token=False,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>")))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.legacy is request.param and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in ("What color is the star?\nIt is red.", "你好，世界 😀 and 12 3", "two  spaces  "):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > 3 and tok.decode(ids) == text
    # Byte fallback: the emoji is four byte pieces, none of them <unk>.
    assert tok.convert_ids_to_tokens(tok.encode("😀", add_special_tokens=False))[-4:] == [
        "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    return tok


def tokenizer_image_token(prompt: str, tok) -> list[int]:
    """mm_utils.tokenizer_image_token: each "<image>" chunk tokenised with special tokens, the first chunk's bos
    kept, every later chunk's first id (its bos) dropped, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    keep_bos = bool(chunks and chunks[0] and chunks[0][0] == tok.bos_token_id)
    out = [chunks[0][0]] if keep_bos else []
    for k, chunk in enumerate(chunks):
        if k:
            out.append(IMAGE_TOKEN_INDEX)
        out += chunk[int(keep_bos):]
    return out


def preprocess_multimodal(turns):
    """train.preprocess_multimodal: a value holding "<image>" becomes "<image>\\n" + the rest, stripped."""
    out = []
    for role, value in turns:
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append((role, value))
    return out


def preprocess_multimodal_next(turns):
    """LLaVA-NeXT's train.preprocess_multimodal (multi-image records): only a value holding exactly one "<image>",
    not at its start, becomes "<image>\\n" + the rest, stripped; values of several markers stay interleaved."""
    out = []
    for role, value in turns:
        if value.count("<image>") == 1 and not value.startswith("<image>"):
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append((role, value))
    return out


def vicuna_prompt(turns, system: str, generation: bool = False) -> str:
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO, sep " ", sep2 "</s>"); generation appends the
    assistant role with no message, as LLaVA's evaluation scripts do."""
    messages = [("USER" if role == "human" else "ASSISTANT", value) for role, value in turns]
    if generation:
        messages = messages[:-1] if messages[-1][0] == "ASSISTANT" else messages
        messages.append(("ASSISTANT", None))
    out = system + " "
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}" + (" ", "</s>")[i % 2] if message else f"{role}:"
    return out


def preprocess_v1(turns, tok, system: str) -> tuple[list[int], list[int]]:
    """train.preprocess_v1 with an image (has_image=True), tokenizers >= 0.14."""
    conversation = vicuna_prompt(turns, system)
    input_ids = tokenizer_image_token(conversation, tok)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tok))
        instruction_len = len(tokenizer_image_token(parts[0], tok)) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        end = max(cur_len, min(cur_len + instruction_len, len(target)))
        target[cur_len:end] = [IGNORE_INDEX] * (end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    total_len = sum(t != tok.pad_token_id for t in input_ids) if tok.pad_token_id is not None else len(input_ids)
    if cur_len != total_len:  # "WARNING: tokenization mismatch ... (ignored)"
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target


def preprocess_plain(turns, tok) -> tuple[list[int], list[int]]:
    """train.preprocess_plain: "<image>" + caption + "\\n", the "<image>" part (bos + image) masked."""
    assert len(turns) == 2 and "<image>" in turns[0][1]
    input_ids = tokenizer_image_token("<image>" + turns[1][1] + "\n", tok)
    n = len(tokenizer_image_token("<image>", tok))
    return input_ids, [IGNORE_INDEX] * n + input_ids[n:]


def expand(input_ids: list[int], target: list[int], image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA's single IMAGE_TOKEN_INDEX -> our run of RUN placeholder ids; LLaVA labels image features IGNORE."""
    ids, loss = [], []
    for token, label in zip(input_ids, target):
        if token == IMAGE_TOKEN_INDEX:
            ids += [image_id] * RUN
            loss += [False] * RUN
        else:
            ids.append(token)
            loss.append(label != IGNORE_INDEX)
    return np.array(ids, np.int32), np.array(loss)


def llava_encoder(tok, template: str, system: str = "") -> ConversationEncoder:
    # The image id lies outside the vocabulary, as LLaVA's -200 does (data.image_token_id).
    return ConversationEncoder(get_template(template), tok, 32000, tok.bos_token_id, tok.eos_token_id, system)


CONVERSATIONS = {
    "single": [("human", "<image>\nWhat color is the star?"), ("gpt", "The star is red.")],
    "multi_turn": [("human", "<image>\nWhat color is the star?"), ("gpt", "Red."),
                   ("human", "Where is it?"), ("gpt", "It is at the top left."),
                   ("human", "Describe the image in detail."), ("gpt", "There are 3 shapes:\n\na blue circle.")],
    "image_not_first": [("human", "What is in the picture?\n<image>  "), ("gpt", "A green square."),
                        ("human", "And 12 red triangles?"), ("gpt", "No.")],
    "unicode": [("human", "<image>\n这是一张图片吗？😀"), ("gpt", "是的，你好 😀🎉 world"),
                ("human", "Ünïcödé ça?"), ("gpt", "Oui — ça 123.")],
    "spaces": [("human", "<image>\n  What color?  "), ("gpt", "  red  "), ("human", " Where? "),
               ("gpt", " top left ")],
    "text_only": [("human", "Hello world 123, <ok>"), ("gpt", "Hello."), ("human", "Again?"), ("gpt", " Yes.")],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_vicuna_v1_equals_llava_preprocess_v1(llama_tok, name):
    turns = CONVERSATIONS[name]
    want_ids, want_target = preprocess_v1(preprocess_multimodal(turns), llama_tok, VICUNA_SYSTEM)
    assert any(t != IGNORE_INDEX for t in want_target)  # LLaVA's own check passed: the example trains
    ids, loss = expand(want_ids, want_target, 32000)
    n_images = sum(value.count("<image>") for _, value in turns)
    enc = llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode(turns, [RUN] * n_images, name)
    assert enc.tokens.tolist() == ids.tolist()
    assert enc.loss.tolist() == loss.tolist()
    assert enc.image_starts == tuple(np.flatnonzero(ids == 32000)[::RUN].tolist()[:n_images])


@pytest.mark.parametrize("name", ["single", "multi_turn", "image_not_first", "unicode"])
def test_vicuna_v1_prompt_equals_llava_evaluation(llama_tok, name):
    """Generation: get_prompt() with the assistant's message None, through tokenizer_image_token."""
    turns = CONVERSATIONS[name]
    ids, _ = expand(tokenizer_image_token(vicuna_prompt(preprocess_multimodal(turns), VICUNA_SYSTEM, True),
                                          llama_tok), [0] * 10_000, 32000)
    enc, answer = llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode_prompt(turns, [RUN], name)
    assert enc.tokens.tolist() == ids.tolist() and answer == turns[-1][1]


MULTI_IMAGE = {
    "interleaved": [("human", "Compare <image> with <image>: same color?"), ("gpt", "No, red and blue."),
                    ("human", "Which is larger?"), ("gpt", "The first.")],
    "one_per_turn": [("human", "What is this? <image>"), ("gpt", "A star."), ("human", "And this <image> one?"),
                     ("gpt", "A disc.")],
    "leading": [("human", "<image><image>\nDescribe both."), ("gpt", "Two shapes.")],
    "at_start_no_newline": [("human", "<image>What is it?"), ("gpt", "A star."), ("human", "Then <image>"),
                            ("gpt", "A disc 😀")],
}


@pytest.mark.parametrize("name", sorted(MULTI_IMAGE))
def test_vicuna_v1_multi_image_equals_llava_next_preprocess(llama_tok, name):
    """Records of several images: markers placed as LLaVA-NeXT's preprocess_multimodal places them, then
    preprocess_v1's ids and mask (the non-legacy length adjustment included)."""
    turns = MULTI_IMAGE[name]
    want_ids, want_target = preprocess_v1(preprocess_multimodal_next(turns), llama_tok, VICUNA_SYSTEM)
    assert any(t != IGNORE_INDEX for t in want_target)
    ids, loss = expand(want_ids, want_target, 32000)
    enc = llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode(turns, [RUN, RUN], name)
    assert enc.tokens.tolist() == ids.tolist()
    assert enc.loss.tolist() == loss.tolist()
    assert enc.image_starts == tuple(np.flatnonzero(ids == 32000)[::RUN].tolist())
    prompt, _ = llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode_prompt(turns, [RUN, RUN], name)
    want_prompt, _ = expand(tokenizer_image_token(
        vicuna_prompt(preprocess_multimodal_next(turns), VICUNA_SYSTEM, True), llama_tok), [0] * 10_000, 32000)
    assert prompt.tokens.tolist() == want_prompt.tolist()


def test_llava_trains_on_the_space_token_of_an_answer_starting_with_a_space(llama_tok):
    """The "- 2" quirk: "ASSISTANT: " alone ends in a lone "▁"; an answer starting with a space keeps a "▁" of
    its own in the round ("ASSISTANT:  red"), the mask ends at ":" and that "▁" carries loss. Reproduced."""
    turns = [("human", "<image>\nWhat color?"), ("gpt", " red")]
    enc = llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode(turns, [RUN], "q")
    first = int(np.flatnonzero(enc.loss)[0])
    assert llama_tok.convert_ids_to_tokens(enc.tokens[first - 1:].tolist()) == [":", "▁", "▁red", "</s>"]
    assert enc.loss[first:].all()


def test_llava_mismatch_is_an_error_naming_the_example(llama_tok):
    """An answer holding " ASSISTANT: " splits its round in three: LLaVA's check fails and it would train
    nothing on the example; vlm_jax stops there."""
    turns = [("human", "<image>\nRepeat after me."), ("gpt", "USER: hi ASSISTANT: hello")]
    _, target = preprocess_v1(turns, llama_tok, VICUNA_SYSTEM)
    assert all(t == IGNORE_INDEX for t in target)
    with pytest.raises(ValueError, match="rec-9: tokenization mismatch"):
        llava_encoder(llama_tok, "vicuna_v1", VICUNA_SYSTEM).encode(turns, [RUN], "rec-9")


@pytest.mark.parametrize("turns", [
    [("human", "<image>\nDescribe the image."), ("gpt", "A red star 在 the top left 😀 ")],
    [("human", "Give a caption <image> please"), ("gpt", "  Three shapes: 12 triangles.")],
])
def test_plain_equals_llava_preprocess_plain(llama_tok, turns):
    ids, loss = expand(*preprocess_plain(turns, llama_tok), 32000)
    enc = llava_encoder(llama_tok, "plain").encode(turns, [RUN], "p")
    assert enc.tokens.tolist() == ids.tolist() and enc.loss.tolist() == loss.tolist()
    prompt, _ = llava_encoder(llama_tok, "plain").encode_prompt(turns, [RUN], "p")
    assert prompt.tokens.tolist() == ids[:1 + RUN].tolist()


def test_plain_takes_exactly_one_image(llama_tok):
    with pytest.raises(ValueError, match="rec-3: template 'plain' takes exactly one image"):
        llava_encoder(llama_tok, "plain").encode([("human", "a caption"), ("gpt", "x")], [], "rec-3")


# ---- Qwen2-style byte-level BPE and ChatML ------------------------------------------------------------------

# Qwen2's pre-tokenizer (tokenizer.json): this split, then byte-level without its own regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<img>", "</img>"]  # the last two: Qwen-VL's
# Qwen2-VL-Instruct's tokenizer_config.json chat_template (images only; its video branch left out).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen_tok():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN2_SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN2_VL_TEMPLATE)
    assert tok.bos_token_id is None and tok.decode(tok.encode("你好 😀\n\nIt is")) == "你好 😀\n\nIt is"
    # "\n\n" is one token: an answer starting with "\n" merges with the "\n" before it when tokenised whole.
    assert len(tok.encode("\n\n")) == 1
    return tok


def chatml_encoder(tok, template: str, system: str = "") -> ConversationEncoder:
    return ConversationEncoder(get_template(template), tok, tok.convert_tokens_to_ids("<|image_pad|>"), None,
                               tok.eos_token_id, system)


def chat_ids(tok, msgs, **kwargs) -> list[int]:
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def messages(turns, system: str | None):
    out = [] if system is None else [dict(role="system", content=system)]
    return out + [dict(role="user" if role == "human" else "assistant", content=value) for role, value in turns]


CHATML_TURNS = [("human", "What color is the star?"), ("gpt", "Red, 12 of them."), ("human", "你好？"),
                ("gpt", "\n\nIt is at the top left 😀"), ("human", " Where? "), ("gpt", " top left ")]


@pytest.mark.parametrize("template", ["chatml", "qwen2_vl", "qwen_vl"])
@pytest.mark.parametrize("system", ["Be brief.", "You are a helpful assistant."])
def test_chatml_equals_apply_chat_template(qwen_tok, template, system):
    """With the system given, and with it left to the template's default ("You are a helpful assistant.")."""
    enc = chatml_encoder(qwen_tok, template, system).encode(CHATML_TURNS, [], "c")
    assert enc.tokens.tolist() == chat_ids(qwen_tok, messages(CHATML_TURNS, system))
    if system == "You are a helpful assistant.":
        assert enc.tokens.tolist() == chat_ids(qwen_tok, messages(CHATML_TURNS, None))
    # Generation: the prompt through "<|im_start|>assistant\n" of the last exchange.
    prompt, _ = chatml_encoder(qwen_tok, template, system).encode_prompt(CHATML_TURNS, [], "c")
    assert prompt.tokens.tolist() == chat_ids(qwen_tok, messages(CHATML_TURNS[:-1], system),
                                              add_generation_prompt=True)


def test_chatml_loss_covers_each_answer_and_its_im_end(qwen_tok):
    enc = chatml_encoder(qwen_tok, "qwen2_vl", "Be brief.").encode(CHATML_TURNS, [], "c")
    runs, cur = [], []
    for token, flag in zip(enc.tokens.tolist(), enc.loss.tolist()):
        if flag:
            cur.append(token)
        elif cur:
            runs.append(qwen_tok.decode(cur))
            cur = []
    # "assistant\n" + "\n\nIt" tokenises whole to "\n\n", "\n", "It": the first token straddles the prefix's
    # "\n" and the answer's first "\n", and carries loss.
    assert runs == ["Red, 12 of them.<|im_end|>", "\n\n\nIt is at the top left 😀<|im_end|>",
                    " top left <|im_end|>"]


def test_qwen2_vl_image_equals_the_template_image_expanded(qwen_tok):
    """Qwen2-VL's template writes each image as "<|vision_start|><|image_pad|><|vision_end|>"; the processor
    repeats <|image_pad|> once per merged patch, our run."""
    turns = [("human", "<image>Describe the image."), ("gpt", "A red star.")]
    enc = chatml_encoder(qwen_tok, "qwen2_vl", "You are a helpful assistant.").encode(turns, [RUN], "i")
    msgs = [dict(role="user", content=[dict(type="image"), dict(type="text", text="Describe the image.")]),
            dict(role="assistant", content="A red star.")]
    ids = chat_ids(qwen_tok, msgs)
    pad = qwen_tok.convert_tokens_to_ids("<|image_pad|>")
    at = ids.index(pad)
    assert enc.tokens.tolist() == ids[:at] + [pad] * RUN + ids[at + 1:]
    assert enc.image_starts == (at,)


def test_qwen2_vl_images_interleaved_equal_the_template_images_expanded(qwen_tok):
    """Two images between text in one turn, and a third in a later turn: each one's pad expanded in place."""
    turns = [("human", "Compare <image> with <image>."), ("gpt", "Both red."), ("human", "<image>And this?"),
             ("gpt", "Blue.")]
    runs = [RUN, RUN + 2, 3]
    enc = chatml_encoder(qwen_tok, "qwen2_vl", "You are a helpful assistant.").encode(turns, runs, "i")
    image, text = dict(type="image"), lambda t: dict(type="text", text=t)
    msgs = [dict(role="user", content=[text("Compare "), image, text(" with "), image, text(".")]),
            dict(role="assistant", content="Both red."), dict(role="user", content=[image, text("And this?")]),
            dict(role="assistant", content="Blue.")]
    ids, pad, want, starts = chat_ids(qwen_tok, msgs), qwen_tok.convert_tokens_to_ids("<|image_pad|>"), [], []
    for token in ids:
        if token == pad:
            starts.append(len(want))
            want += [pad] * runs[len(starts) - 1]
        else:
            want.append(token)
    assert enc.tokens.tolist() == want and enc.image_starts == tuple(starts) and len(starts) == 3


def qwen_vl_finetune(turns, tok, system: str) -> tuple[list[int], list[int]]:
    """Qwen-VL's finetune.py preprocess: role, "\\n" and message tokenised apart; labels on every turn's
    <|im_start|>, <|im_end|> and the "\\n" after it, and on assistant messages."""
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    nl = tok("\n").input_ids
    ids = [im_start] + tok("system").input_ids + nl + tok(system).input_ids + [im_end] + nl
    labels = [im_start] + [IGNORE_INDEX] * (len(ids) - 3) + [im_end] + nl
    for role, value in turns:
        role_ids = tok("<|im_start|>user" if role == "human" else "<|im_start|>assistant").input_ids
        turn = role_ids + nl + tok(value).input_ids + [im_end] + nl
        ids += turn
        if role == "human":
            labels += [im_start] + [IGNORE_INDEX] * (len(turn) - 3) + [im_end] + nl
        else:
            labels += [im_start] + [IGNORE_INDEX] * len(role_ids) + turn[len(role_ids) + 1:-2] + [im_end] + nl
    return ids, labels


def test_qwen_vl_equals_qwen_vl_finetune(qwen_tok):
    """Ids and labels as Qwen-VL's finetune.py builds them (messages not starting with a newline, where its
    apart-tokenised "\\n" + message equals the whole string), each image's path and <imgpad> run between <img>
    and </img> being our placeholder run."""
    turns = [("human", "<image>\nWhat color is the star? 你好"), ("gpt", "Red, 12 of them."),
             ("human", "Where is it?"), ("gpt", " top left 😀 ")]
    enc = chatml_encoder(qwen_tok, "qwen_vl", "You are a helpful assistant.").encode(turns, [RUN], "v")
    value = turns[0][1].replace("<image>", "Picture 1: <img></img>")
    ids, labels = qwen_vl_finetune([(turns[0][0], value)] + turns[1:], qwen_tok, "You are a helpful assistant.")
    at = ids.index(qwen_tok.convert_tokens_to_ids("</img>"))
    pad = qwen_tok.convert_tokens_to_ids("<|image_pad|>")
    assert enc.tokens.tolist() == ids[:at] + [pad] * RUN + ids[at:]
    assert enc.loss.tolist() == [label != IGNORE_INDEX for label in labels[:at]] + [False] * RUN + [
        label != IGNORE_INDEX for label in labels[at:]]
    assert enc.image_starts == (at,)


# ---- the stage configs carry the released system texts --------------------------------------------------------

@pytest.mark.parametrize("system,stage,want", [
    ("sharegpt4v_7b", "stage2", VICUNA_SYSTEM),
    ("sharegpt4v_13b", "stage2", VICUNA_SYSTEM),
    ("belle_vl", "stage2", "You are a helpful assistant."),
    ("points15_7b", "stage2", ""),
    ("ziya_blip2_14b", "stage2", ""),
    ("xverse_v_13b", "stage2", ""),
])
def test_stage_configs_carry_the_released_system_text(system, stage, want):
    assert load_config(os.path.join(ROOT, "configs", f"{system}.py:{stage}")).data.system == want
