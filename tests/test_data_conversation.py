import numpy as np
import pytest

from vlm_jax.data.conversation import TEMPLATES, ConversationEncoder, get_template
from vlm_jax.data.tokenizer import load_tokenizer, special_ids

TOK = load_tokenizer("")
IDS = special_ids(TOK)
N_IMG = 7
MULTI = [("human", "<image>\nWhat color is the star?"), ("gpt", "red"),
         ("human", "And where is it?"), ("gpt", "top left")]
SINGLE = MULTI[:2]


def encoder(name: str, system: str = "") -> ConversationEncoder:
    return ConversationEncoder(get_template(name), TOK, IDS.image, IDS.bos, IDS.eos, system)


def end_text(name: str) -> str:
    end = TEMPLATES[name].end
    return TOK.eos_token if end is None else end


def loss_runs(tokens: np.ndarray, loss: np.ndarray) -> list[str]:
    """Decoded text of each maximal run of loss tokens."""
    runs, cur = [], []
    for t, flag in zip(tokens.tolist(), loss.tolist()):
        if flag:
            cur.append(t)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return runs


EXPECTED = {
    # (conversation, system) -> full decoded string; the image run decodes as N_IMG "<image>" tokens.
    "plain": (SINGLE, "", "<s>" + "<image>" * N_IMG + "red\n"),
    "vicuna_v1": (MULTI, "SYS.", "<s>SYS. USER: " + "<image>" * N_IMG + "\nWhat color is the star? ASSISTANT: red</s>"
                  "USER: And where is it? ASSISTANT: top left</s>"),
    "xverse": (MULTI, "", "<s>Human: " + "<image>" * N_IMG + "\nWhat color is the star?\nAssistant: red</s>"
               "Human: And where is it?\nAssistant: top left</s>"),
    "chatml": (MULTI, "Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + "<image>" * N_IMG
               + "\nWhat color is the star?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
               "<|im_start|>user\nAnd where is it?<|im_end|>\n<|im_start|>assistant\ntop left<|im_end|>\n"),
    "qwen_vl": (MULTI, "Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <img>"
                + "<image>" * N_IMG + "</img>\nWhat color is the star?<|im_end|>\n<|im_start|>assistant\n"
                "red<|im_end|>\n<|im_start|>user\nAnd where is it?<|im_end|>\n<|im_start|>assistant\n"
                "top left<|im_end|>\n"),
    "qwen2_vl": (MULTI, "", "<|im_start|>user\n<|vision_start|>" + "<image>" * N_IMG + "<|vision_end|>\nWhat color is "
                 "the star?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nAnd where is it?"
                 "<|im_end|>\n<|im_start|>assistant\ntop left<|im_end|>\n"),
    # Ziya-BLIP2's query tokens stand before bos and the text (image_prefix), the marker's turn stripped.
    "ziya": (MULTI, "", "<image>" * N_IMG + "<s><human>:What color is the star?\n<bot>:red</s>\n"
             "<human>:And where is it?\n<bot>:top left</s>\n"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_form_and_loss_mask(name):
    turns, system, full = EXPECTED[name]
    enc = encoder(name, system).encode(turns, [N_IMG], "ex-1")
    assert enc.tokens.dtype == np.int32 and enc.loss.dtype == bool and enc.tokens.shape == enc.loss.shape
    assert TOK.decode(enc.tokens.tolist()) == full
    # Loss covers exactly each answer piece plus its end token; Qwen-VL's finetune.py labels every turn's
    # <|im_start|> and <|im_end|>\n too.
    answers = [TEMPLATES[name].answer.format(a=a) + end_text(name) for role, a in turns if role == "gpt"]
    if TEMPLATES[name].label_turn_marks:
        answers = ["<|im_start|>", "<|im_end|>\n<|im_start|>", "<|im_end|>\n<|im_start|>",
                   "red<|im_end|>\n<|im_start|>", "<|im_end|>\n<|im_start|>", "top left<|im_end|>\n"]
    assert loss_runs(enc.tokens, enc.loss) == answers
    # One image run of the requested length, no loss on it, no stray placeholder ids.
    (start,) = enc.image_starts
    assert (enc.tokens[start:start + N_IMG] == IDS.image).all()
    assert (enc.tokens == IDS.image).sum() == N_IMG
    assert not enc.loss[start:start + N_IMG].any()


def test_empty_system_is_skipped():
    enc = encoder("vicuna_v1").encode(SINGLE, [2], "x")
    assert TOK.decode(enc.tokens.tolist()) == "<s>USER: <image><image>\nWhat color is the star? ASSISTANT: red</s>"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_form(name):
    turns, system, full = EXPECTED[name]
    enc, answer = encoder(name, system).encode_prompt(turns, [N_IMG], "ex-1")
    assert answer == turns[-1][1]
    prompt = TOK.decode(enc.tokens.tolist())
    # The prompt is the training string cut right before the last answer.
    last_answer = TEMPLATES[name].answer.format(a=answer) + end_text(name) + TEMPLATES[name].after_end
    assert full == prompt + last_answer
    # Ending on a human turn gives the same prompt and no reference answer.
    enc2, answer2 = encoder(name, system).encode_prompt(turns[:-1], [N_IMG], "ex-1")
    assert answer2 is None and (enc2.tokens == enc.tokens).all()


def test_stop_ids():
    vocab = TOK.get_vocab()
    assert encoder("vicuna_v1").stop_id == IDS.eos
    assert encoder("xverse").stop_id == IDS.eos
    assert encoder("chatml").stop_id == vocab["<|im_end|>"]
    assert TOK.decode([encoder("plain").stop_id]) == "\n"


def test_multiple_images_and_text_only():
    turns = [("human", "<image> and <image>: same?"), ("gpt", "no")]
    enc = encoder("vicuna_v1").encode(turns, [3, 5], "two")
    assert len(enc.image_starts) == 2
    s0, s1 = enc.image_starts
    assert (enc.tokens[s0:s0 + 3] == IDS.image).all() and (enc.tokens[s1:s1 + 5] == IDS.image).all()
    assert (enc.tokens == IDS.image).sum() == 8
    text_only = encoder("vicuna_v1").encode([("human", "hi"), ("gpt", "hello")], [], "t")
    assert text_only.image_starts == () and loss_runs(text_only.tokens, text_only.loss) == [" hello</s>"]


@pytest.mark.parametrize("turns, images, match", [
    ([], [], "empty conversation"),
    ([("gpt", "hi"), ("human", "x")], [], "turn 0 has role 'gpt'"),
    ([("human", "a"), ("human", "b")], [], "turn 1 has role 'human'"),
    ([("human", "a"), ("gpt", "b"), ("gpt", "c")], [], "turn 2"),
    ([("user", "a"), ("gpt", "b")], [], "role 'user'"),
    ([("human", "<image>\nq"), ("gpt", "a")], [], "1 <image> markers but 0 images"),
    ([("human", "q"), ("gpt", "a")], [4], "0 <image> markers but 1 images"),
    ([("human", "q"), ("gpt", "<image>")], [], "marker in a 'gpt' turn"),
    ([("human", "q")], [], "ends with a 'human' turn"),
])
def test_bad_conversations_name_the_example(turns, images, match):
    with pytest.raises(ValueError, match=match) as e:
        encoder("vicuna_v1").encode(turns, images, "rec-42")
    assert "rec-42" in str(e.value)


def test_plain_is_single_turn_and_drops_question():
    with pytest.raises(ValueError, match="rec-7.*one exchange"):
        encoder("plain").encode(MULTI, [1], "rec-7")
    enc = encoder("plain").encode([("human", "Describe this <image> please"), ("gpt", "a cat")], [2], "p")
    assert TOK.decode(enc.tokens.tolist()) == "<s><image><image>a cat\n"


def test_unknown_template():
    with pytest.raises(ValueError, match="nope.*chatml"):
        get_template("nope")


def test_image_wrappers_number_each_image():
    """Qwen-VL: every image is "Picture k: <img>" + its slots + "</img>", k counting across turns."""
    turns = [("human", "<image>\n<image>\nSame?"), ("gpt", "no"), ("human", "<image>\nAnd this?"), ("gpt", "yes")]
    enc = encoder("qwen_vl").encode(turns, [2, 3, 1], "multi")
    text = TOK.decode(enc.tokens.tolist())
    assert ("Picture 1: <img><image><image></img>\nPicture 2: <img><image><image><image></img>\nSame?" in text
            and "Picture 3: <img><image></img>\nAnd this?" in text)
    for start, n in zip(enc.image_starts, [2, 3, 1]):
        assert (enc.tokens[start:start + n] == IDS.image).all() and enc.tokens[start - 1] != IDS.image


def test_vision_start_end_wrap_each_image_as_single_ids():
    """Qwen2-VL / POINTS1.5: "<|vision_start|>" slots "<|vision_end|>", each wrapper one special id."""
    enc = encoder("qwen2_vl").encode([("human", "<image>\nSame?"), ("gpt", "no")], [3], "one")
    (start,) = enc.image_starts
    ids = TOK.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert enc.tokens[start - 1] == ids[0] and enc.tokens[start + 3] == ids[1]
