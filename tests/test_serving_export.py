"""The `hf` export as transformers serves it (vlm_jax/interop/serving.py): the chat template generated from each
conversation template renders the ids ConversationEncoder gives, and for LLaVA, Qwen2-VL and BLIP-2 (a LLaMA LM,
as Ziya-BLIP2) a tiny checkpoint imported with its own processor, or trained by vlm_jax, and exported generates
through AutoProcessor + the model class the same greedy tokens as vlm_jax, on non-square drawn images and
multi-turn prompts."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from configs.base import get_config
from tests.helpers import randomize_torch, tiny_config
from vlm_jax import parallel
from vlm_jax.data.conversation import IMAGE_MARKER, TEMPLATES, ConversationEncoder
from vlm_jax.data.tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer, special_ids
from vlm_jax.errors import InputError
from vlm_jax.inference import Assistant, inference_config
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.interop.hf_import import import_checkpoint
from vlm_jax.interop.serving import _probe, chat_template
from vlm_jax.train import loop

BASE = get_config().model
MESH = parallel.make_mesh(get_config().mesh)
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


# ---- import -> chat -> export -> transformers generate ---------------------------------------------------------

NEW_TOKENS = 8
IMAGE_ID = 4  # the demo tokenizer's <image>: each tiny checkpoint's config.json image token


def drawn(width: int, height: int, seed: int) -> Image.Image:
    """A non-square RGB picture: shapes in colours a seed picks on a light background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(180, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        box = (x0, y0, x0 + int(rng.integers(6, width // 2)), y0 + int(rng.integers(6, height // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=colour)
    return img


def chats(image_a: Image.Image, image_b: Image.Image) -> dict[str, list[dict]]:
    """A single-image prompt and a 2-exchange multi-turn one, in transformers' message format."""
    def with_image(image, text):
        return dict(role="user", content=[dict(type="image", image=image), dict(type="text", text=text)])

    return {
        "single": [with_image(image_a, "What is in the picture?")],
        "multi-turn": [with_image(image_b, "Describe the shapes."),
                       dict(role="assistant", content=[dict(type="text", text="Two discs and a box.")]),
                       dict(role="user", content=[dict(type="text", text="Which colour is the box?")])],
    }


def with_image_token_renamed(root, old: str, new: str) -> str:
    """The demo tokenizer with token `old` (model vocabulary and added token) renamed `new`, same ids; its folder."""
    spec = json.loads(open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer.json")).read())
    spec["model"]["vocab"][new] = spec["model"]["vocab"].pop(old)
    for token in spec["added_tokens"]:
        if token["content"] == old:
            token["content"] = new
    config = json.loads(open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer_config.json")).read())
    config["extra_special_tokens"] = [new if t == old else t for t in config["extra_special_tokens"]]
    os.makedirs(root)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(root)


def _template_argument(processor) -> dict:
    """transformers' Blip2Processor drops the chat template it loads (its __init__ does not pass it on); its
    tokenizer holds it."""
    return dict(chat_template=processor.tokenizer.chat_template) if processor.chat_template is None else {}


def assert_same_generation(source: str, export: str, model_class, placeholder: int | None = None,
                           overrides: tuple[str, ...] = ()) -> None:
    """For each chat, vlm_jax's Assistant on `source` and transformers on the exported directory, as its user runs
    it: equal prompt ids (vlm_jax's `placeholder` standing for the export's image token where it lies outside the
    vocabulary) and equal greedy tokens, which stop at the same place or run all NEW_TOKENS, and are not one token
    repeated."""
    assistant = Assistant.load(source, inference_config(source, overrides=overrides))
    processor = transformers.AutoProcessor.from_pretrained(export)
    model = model_class.from_pretrained(export, dtype=torch.float32).eval()
    config = json.loads(open(os.path.join(export, "config.json")).read())
    image_id = config.get("image_token_index", config.get("image_token_id"))
    stop = json.loads(open(os.path.join(export, "generation_config.json")).read())["eos_token_id"]
    for name, messages in chats(drawn(52, 34, 0), drawn(30, 58, 1)).items():
        images = [item["image"] for m in messages for item in m["content"] if item["type"] == "image"]
        prompt = assistant.prompt(turns_of(messages), images)
        (completion,) = assistant.generate([prompt], max_new_tokens=NEW_TOKENS)
        want_prompt, want = prompt["tokens"].tolist(), completion.tokens
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", **_template_argument(processor))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
        got_prompt = inputs["input_ids"][0].tolist()
        got = out[0, len(got_prompt):].tolist()
        if placeholder is not None:
            want_prompt = [image_id if t == placeholder else t for t in want_prompt]
        assert got_prompt == want_prompt, name
        assert image_id in got_prompt, name
        assert got == want, name
        assert len(set(got)) > 1, (name, got)
        assert len(got) == NEW_TOKENS or got[-1] == stop, (name, got)


def _save_with_processor(model, processor, path) -> str:
    randomize_torch(model, 0)
    model.eval().save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def test_llava_import_chat_export_generates_the_same(tmp_path):
    """LLaVA (CLIP tower, LLaMA) with llava-hf's processor (CLIP resize + centre crop) and the demo tokenizer."""
    tok = load_tokenizer("")
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
            image_size=32, hidden_act="quick_gelu"),
        text_config=transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=IMAGE_ID, vision_feature_layer=-2, image_seq_length=4))
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    hf = _save_with_processor(model, processor, tmp_path / "hf")
    import_checkpoint(hf, str(tmp_path / "ckpt"), BASE, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    assert_same_generation(str(tmp_path / "ckpt"), str(tmp_path / "out"), transformers.LlavaForConditionalGeneration)
    # An image token id the tokenizer gives another token cannot be served: one error, nothing written.
    with pytest.raises(InputError, match="the tokenizer's <image> is id 4 but config.json's image_token_index is 500"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out500"), "hf", image_token_index=500)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out500")]


def test_qwen2_vl_import_chat_export_generates_the_same(tmp_path, monkeypatch):
    """Qwen2-VL with its processor (smart_resize) and a tokenizer holding Qwen2-VL's <|image_pad|>."""
    tok = load_tokenizer(with_image_token_renamed(tmp_path / "tok", IMAGE_MARKER, "<|image_pad|>"))
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4, mlp_ratio=2),
        text_config=dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        image_token_id=IMAGE_ID))
    hf = tmp_path / "hf"
    randomize_torch(model, 0)
    model.eval().save_pretrained(str(hf))
    tok.save_pretrained(str(hf))
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    image_processor.save_pretrained(str(hf))
    import_checkpoint(str(hf), str(tmp_path / "ckpt"), BASE, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    # No torchvision here: transformers cannot build Qwen2VLProcessor's video processor, so the processor is
    # built from its image processor and tokenizer alone (the export writes the video processor's settings too).
    monkeypatch.setattr(transformers.Qwen2VLProcessor, "get_attributes",
                        classmethod(lambda cls: ["image_processor", "tokenizer"]))
    # The tokenizer has no <image>: vlm_jax's placeholder is the import's image token, Qwen2-VL's <|image_pad|>, as
    # for the released model; the import's pixel bounds are the ones vlm_jax resizes by and the export keeps.
    config = inference_config(str(tmp_path / "ckpt"))
    assert (config.data.image_token_id, config.data.min_pixels, config.data.max_pixels) == (
        IMAGE_ID, 28 * 28 * 4, 28 * 28 * 16)
    exported = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (exported["min_pixels"], exported["max_pixels"]) == (28 * 28 * 4, 28 * 28 * 16)
    assert_same_generation(str(tmp_path / "ckpt"), str(tmp_path / "out"), transformers.Qwen2VLForConditionalGeneration)


def test_blip2_import_chat_export_generates_the_same(tmp_path):
    """BLIP-2 with a LLaMA LM (Ziya-BLIP2's shape), its BlipImageProcessor (squash) and the demo tokenizer: the
    query tokens before bos."""
    tok = load_tokenizer("")
    model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=28, patch_size=14),
        qformer_config=transformers.Blip2QFormerConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=40, cross_attention_frequency=1),
        text_config=transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id),
        num_query_tokens=5, image_token_index=IMAGE_ID))
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tok,
        num_query_tokens=5)
    hf = _save_with_processor(model, processor, tmp_path / "hf")
    import_checkpoint(hf, str(tmp_path / "ckpt"), BASE, MESH)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "hf")
    assert_same_generation(str(tmp_path / "ckpt"), str(tmp_path / "out"), transformers.Blip2ForConditionalGeneration)


def test_a_vlm_jax_trained_model_exports_a_served_directory(tmp_path):
    """The tiny demo model trained one step with a tokenizer that has no <image> (placeholder id -200, LLaVA's):
    the export adds <image> at the new embedding row config.json names, and transformers generates vlm_jax's
    tokens."""
    folder = with_image_token_renamed(tmp_path / "tok", IMAGE_MARKER, "<unused0>")
    run = str(tmp_path / "run")
    loop.train(tiny_config("total_steps=1", "checkpoint_every=1", "model.connector.in_norm=False", "data.max_tiles=1",
                           f"data.tokenizer={folder}", "data.image_token_id=-200"), run)
    export_checkpoint(run, str(tmp_path / "out"), "hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_token_index"] == 512 and config["text_config"]["vocab_size"] == 513
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert exported.convert_tokens_to_ids(IMAGE_MARKER) == 512 and exported.convert_ids_to_tokens(4) == "<unused0>"
    assert_same_generation(run, str(tmp_path / "out"), transformers.LlavaForConditionalGeneration, placeholder=-200)


def _probe_of(name: str, tokenizer) -> str | None:
    encoder = ConversationEncoder(TEMPLATES[name], tokenizer, IDS.image, IDS.bos, IDS.eos, "Be brief.")
    return _probe(encoder, tokenizer, chat_template(TEMPLATES[name], "Be brief.", IMAGE_MARKER), IMAGE_MARKER,
                  IDS.image)


def test_export_probe_finds_a_tokenizer_that_tokenises_the_render_otherwise(tmp_path):
    """The export renders a probe conversation both ways and warns where they differ: never for the byte-level
    demo tokenizer; for one whose post-processor adds bos, under a template without bos (a served prompt would
    start with a bos vlm_jax never saw)."""
    assert [name for name in sorted(TEMPLATES) if _probe_of(name, TOK)] == []
    spec = json.loads(open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer.json")).read())
    spec["post_processor"] = dict(type="TemplateProcessing", single=[dict(SpecialToken=dict(id="<s>", type_id=0)),
                                                                     dict(Sequence=dict(id="A", type_id=0))],
                                  pair=[dict(Sequence=dict(id="A", type_id=0))],
                                  special_tokens={"<s>": dict(id="<s>", ids=[IDS.bos], tokens=["<s>"])})
    folder = tmp_path / "bos"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer_config.json")) as f:
        (folder / "tokenizer_config.json").write_text(f.read())
    adds_bos = load_tokenizer(str(folder))
    assert adds_bos("hi")["input_ids"][0] == IDS.bos
    assert _probe_of("qwen2_vl", adds_bos).startswith(
        "at token 0: ['<s>', '<|im_start|>', 'system'] against ['<|im_start|>', 'system', ")
    assert _probe_of("vicuna_v1", adds_bos) is None  # its render starts with bos: no second one is added
