"""The `hf` export as transformers serves it (vlm_jax/interop/serving.py): the chat template generated from each
conversation template renders the ids ConversationEncoder gives, and for LLaVA, Qwen2-VL and BLIP-2 (a LLaMA LM,
as Ziya-BLIP2) a tiny checkpoint imported with its own processor, or trained by vlm_jax, and exported generates
through AutoProcessor + the model class the same greedy tokens as vlm_jax, on non-square drawn images and
multi-turn prompts."""

import pytest

from vlm_jax.data.conversation import IMAGE_MARKER, TEMPLATES, ConversationEncoder
from vlm_jax.data.tokenizer import load_tokenizer, special_ids
from vlm_jax.interop.serving import chat_template

TOK = load_tokenizer("")
IDS = special_ids(TOK)
RUN = 3  # placeholder ids per image in the template tests


def user(text: str, images: int = 0) -> dict:
    return dict(role="user", content=[dict(type="image")] * images + [dict(type="text", text=text)])


def turns_of(messages: list[dict]) -> list[tuple[str, str]]:
    """vlm_jax's turns of transformers messages: a user message's images as markers first, each with "\\n"."""
    out = []
    for m in messages:
        items = m["content"]
        images = sum(item["type"] == "image" for item in items)
        text = "".join(item["text"] for item in items if item["type"] == "text")
        out.append(("human" if m["role"] == "user" else "gpt", (IMAGE_MARKER + "\n") * images + text))
    return out


def rendered_ids(name: str, system: str, messages: list[dict], images: int) -> list[int]:
    """What a processor makes of the generated template's render: each image token expanded into its run, or
    (image_prefix, Blip2Processor) the runs before the whole text."""
    text = TOK.apply_chat_template(messages, chat_template=chat_template(TEMPLATES[name], system, IMAGE_MARKER),
                                   tokenize=False, add_generation_prompt=True)
    ids = TOK(text.replace(IMAGE_MARKER, IMAGE_MARKER * RUN), add_special_tokens=False)["input_ids"]
    return [IDS.image] * (RUN * images) + ids if TEMPLATES[name].image_prefix else ids


CONVERSATIONS = {
    "one image": [user(" What is in the picture? ", 1)],
    "multi-turn": [user("Describe it.", 1), dict(role="assistant", content=[dict(type="text", text="A red disc.")]),
                   user("And its size?")],
    "two images": [user("Which is larger?", 2)],
    "text only": [user("Say hi.")],
}


def n_images(messages: list[dict]) -> int:
    return sum(item["type"] == "image" for m in messages for item in m["content"])


# Every template with every conversation it takes (LLaVA's plain: one image, one exchange).
CASES = [(name, c) for name in sorted(TEMPLATES) for c in sorted(CONVERSATIONS)
         if TEMPLATES[name].keep_question or (n_images(CONVERSATIONS[c]) == 1 and len(CONVERSATIONS[c]) == 1)]


@pytest.mark.parametrize("name, conversation", CASES)
def test_generated_chat_template_renders_the_encoders_ids(name, conversation):
    """Generation form (ending on a user message) and, when the conversation has answers, the training form:
    the ids ConversationEncoder gives, with the configured system text and with a system message instead."""
    template, messages = TEMPLATES[name], CONVERSATIONS[conversation]
    images = n_images(messages)
    for system, given in (("Be brief.", []), ("", [dict(role="system", content="Be very brief.")])):
        encoder = ConversationEncoder(template, TOK, IDS.image, IDS.bos, IDS.eos, system or "Be very brief.")
        want, _ = encoder.encode_prompt(turns_of(messages), [RUN] * images, "x")
        assert rendered_ids(name, system, given + messages, images) == want.tokens.tolist()
    if len(messages) > 1:
        full = messages[:2]
        want = ConversationEncoder(template, TOK, IDS.image, IDS.bos, IDS.eos).encode(turns_of(full), [RUN], "x")
        text = TOK.apply_chat_template(full, chat_template=chat_template(template, "", IMAGE_MARKER), tokenize=False)
        got = TOK(text.replace(IMAGE_MARKER, IMAGE_MARKER * RUN), add_special_tokens=False)["input_ids"]
        assert ([IDS.image] * RUN if template.image_prefix else []) + got == want.tokens.tolist()
