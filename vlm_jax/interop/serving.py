"""What an `hf` export of a LLaVA, Qwen2-VL or BLIP-2 model writes beside its weights so that transformers serves
it as vlm_jax ran it: `AutoProcessor.from_pretrained(dir)` and the model class load it, and
`model.generate(**processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
return_dict=True, return_tensors="pt"))` gives vlm_jax's greedy tokens (tests/test_serving_export.py).

- The tokenizer, holding the family's image token at the id config.json gives it (`<image>`, or Qwen2-VL's
  `<|image_pad|>`); a tokenizer without it gets it added at exactly that id.
- `processor_config.json`: the family's processor (LlavaProcessor with patch_size, vision_feature_select_strategy
  and num_additional_image_tokens; Qwen2VLProcessor; Blip2Processor with num_query_tokens) and its image
  processor, the one vlm_jax used for this model (`preprocessor_config.json` holds it too).
- `chat_template.jinja`: vlm_jax's conversation template (data.template, data.system) as Jinja (`chat_template`);
  tokenizer and processor both read it.
- `generation_config.json`: greedy, eos the template's stop id.
"""

import json
import logging
import os
import tempfile
from typing import Any

import ml_collections
import transformers
from transformers import AddedToken, PreTrainedTokenizerBase

from vlm_jax.data.conversation import IMAGE_MARKER, LLAVA, ConversationEncoder, Template, get_template
from vlm_jax.data.image_kinds import data_kind, tile_processor
from vlm_jax.data.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_FILE
from vlm_jax.data.records import make_encoder
from vlm_jax.errors import InputError

# family -> (its processor's image token, the config.json key of that token's id)
IMAGE_TOKENS = {"llava": ("<image>", "image_token_index"), "blip2": ("<image>", "image_token_index"),
                "qwen2_vl": ("<|image_pad|>", "image_token_id")}
CHAT_TEMPLATE_FILE, LEGACY_TEMPLATE_FILE = "chat_template.jinja", "chat_template.json"


def _literal(text: str) -> str:
    """`text` as a Jinja string literal: Jinja decodes Python escapes, and JSON's ASCII escapes are among them."""
    return json.dumps(text)


def _around(fmt: str, field: str, template: Template) -> tuple[str, str]:
    """(text before, text after) the one `{field}` of a template piece."""
    before, found, after = fmt.partition("{" + field + "}")
    if not found or "{" + field + "}" in after:
        raise ValueError(f"template {template.name!r}: piece {fmt!r} must hold {{{field}}} once")
    return before, after


def _numbered(fmt: str) -> str:
    """A Jinja expression of image_before / image_after, "{k}" being the image's number (ns.k)."""
    return " ~ ns.k ~ ".join(_literal(part) for part in fmt.split("{k}"))


def _text(value: str) -> str:
    """A Jinja expression: the text of a message's content, a string or a list of items."""
    return (f"({value} if {value} is string else {value} | selectattr('type', 'equalto', 'text') "
            "| map(attribute='text') | join(''))")


def chat_template(template: Template, system: str, image_token: str) -> str:
    """A Jinja chat template rendering a transformers conversation as `template` encodes it (ConversationEncoder).

    Messages are {"role": "system" | "user" | "assistant", "content": text or items}; a first system message
    replaces `system` (data.system). A user message's image items become image markers placed first in the turn,
    each followed by "\\n", then its text items joined (vlm_jax's chat convention): each marker renders as
    image_before + `image_token` + image_after, the token the processor expands into the image's run; with
    image_prefix markers render nothing (the processor puts the runs before the text). A user message renders
    through the assistant prefix, as vlm_jax's prompts end, with or without add_generation_prompt.
    """
    sys_before, sys_after = _around(template.system, "system", template) if template.system else ("", "")
    user_before, user_after = _around(template.user, "q", template)
    answer_before, answer_after = _around(template.answer, "a", template)
    end = "eos_token" if template.end is None else _literal(template.end)
    image = f"{_numbered(template.image_before)} ~ {_literal(image_token)} ~ {_numbered(template.image_after)}"
    if not template.keep_question:  # LLaVA plain: the images alone
        question = "{%- for _ in range(ns.n) -%}{%- set ns.k = ns.k + 1 -%}{{- " + image + " -}}{%- endfor -%}"
    elif template.image_prefix:
        question = "{{- (ns.text | trim) if ns.n else ns.text -}}"
    elif template.build == LLAVA:  # preprocess_multimodal: a turn's one image first, then its stripped text
        question = ("{%- if ns.n == 1 -%}{%- set ns.k = ns.k + 1 -%}{{- ((" + image + ") ~ '\\n' ~ (ns.text | trim))"
                    " | trim -}}{%- else -%}{%- for _ in range(ns.n) -%}{%- set ns.k = ns.k + 1 -%}{{- " + image +
                    " ~ '\\n' -}}{%- endfor -%}{{- ns.text -}}{%- endif -%}")
    else:
        question = ("{%- for _ in range(ns.n) -%}{%- set ns.k = ns.k + 1 -%}{{- " + image + " ~ '\\n' -}}"
                    "{%- endfor -%}{{- ns.text -}}")
    return "".join([
        "{%- set ns = namespace(system=" + _literal(system) + ", k=0, n=0, text='') -%}",
        "{%- set turns = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set ns.system = " + _text("messages[0]['content']") + " -%}",
        "{%- set turns = messages[1:] -%}",
        "{%- endif -%}",
        "{{- bos_token -}}" if template.bos else "",
        "{%- if ns.system -%}{{- " + _literal(sys_before) + " ~ ns.system ~ " + _literal(sys_after) + " -}}"
        "{%- endif -%}" if template.system else "",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set ns.n = 0 -%}{%- set ns.text = '' -%}",
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}{%- else -%}",
        "{%- for item in message['content'] -%}",
        "{%- if item['type'] == 'image' -%}{%- set ns.n = ns.n + 1 -%}",
        "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text ~ item['text'] -%}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{{- " + _literal(user_before) + " -}}", question, "{{- " + _literal(user_after) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- " + _literal(answer_before) + " ~ " + _text("message['content']") + " ~ " + _literal(answer_after) +
        " ~ " + end + " ~ " + _literal(template.after_end) + " -}}",
        "{%- else -%}{{- raise_exception('role ' ~ message['role'] ~ ': this template takes system, user and "
        "assistant messages') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ])


def placeholder_id(tokenizer: PreTrainedTokenizerBase, family: str) -> int | None:
    """The id of `family`'s image token in `tokenizer`, None where it has none (the export then picks one)."""
    return tokenizer.get_vocab().get(IMAGE_TOKENS[family][0]) if family in IMAGE_TOKENS else None


def _with_image_token(tokenizer: PreTrainedTokenizerBase, text: str, token_id: int, scratch: str,
                      key: str) -> PreTrainedTokenizerBase:
    """`tokenizer` holding `text` at `token_id`, added there when it lacks it."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        if vocab[text] != token_id:
            raise InputError(f"the tokenizer's {text} is id {vocab[text]} but config.json's {key} is {token_id}: "
                             f"export with --image_token_index {vocab[text]}")
        return tokenizer
    taken = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    if taken is not None:
        raise InputError(f"config.json's {key} {token_id} is the tokenizer's {taken!r}, not {text}: export with "
                         f"--image_token_index {len(tokenizer)} (a new id) or at the tokenizer's {text}")
    if token_id == len(tokenizer):
        tokenizer.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
    else:  # past the end: tokenizers numbers an added token after the vocabulary, so it goes into the model's
        tokenizer.save_pretrained(scratch)
        file = os.path.join(scratch, "tokenizer.json")
        with open(file) as f:
            spec = json.load(f)
        if not isinstance(spec["model"].get("vocab"), dict):
            raise InputError(f"cannot add {text} at id {token_id} to a {spec['model']['type']} tokenizer of "
                             f"{len(tokenizer)} tokens: export with --image_token_index {len(tokenizer)}")
        spec["model"]["vocab"][text] = token_id
        spec["added_tokens"].append(dict(id=token_id, content=text, single_word=False, lstrip=False, rstrip=False,
                                         normalized=False, special=True))
        with open(file, "w") as f:
            json.dump(spec, f, ensure_ascii=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(scratch)
    if tokenizer.convert_tokens_to_ids(text) != token_id:
        raise InputError(f"adding {text} to the tokenizer gave id {tokenizer.convert_tokens_to_ids(text)}, not "
                         f"config.json's {key} {token_id}")
    logging.info("export: the tokenizer had no %s; added it at id %d (config.json's %s)", text, token_id, key)
    return tokenizer


def _image_processor(family: str, config: ml_collections.ConfigDict, scratch: str) -> tuple[dict[str, Any], Any]:
    """(preprocessor_config.json, the transformers image processor) of what vlm_jax used for this model."""
    if family == "qwen2_vl":
        v, d = config.model.vision, config.data
        # navit_patches: PIL bicubic, x 1/255, the CLIP mean and std.
        spec = dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True, resample=3, do_rescale=True,
                    rescale_factor=1 / 255, do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN),
                    image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
                    min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                    size=dict(shortest_edge=d.min_pixels, longest_edge=d.max_pixels), patch_size=v.patch_size,
                    temporal_patch_size=v.temporal_patch_size, merge_size=config.model.connector.merge_size)
    else:
        spec = tile_processor(config).to_hf()
    folder = os.path.join(scratch, "image_processor")
    os.makedirs(folder)
    with open(os.path.join(folder, PREPROCESSOR_FILE), "w") as f:
        json.dump(spec, f, indent=2)
    return spec, transformers.AutoImageProcessor.from_pretrained(folder)


# A conversation the export renders both ways: answers, a stripped question, an image.
_PROBE = [("human", "<image>\n What is shown here? "), ("gpt", "A red disc."), ("human", "Its size, please.")]


def _probe(encoder: ConversationEncoder, tokenizer: PreTrainedTokenizerBase, template_text: str, image_token: str,
           image_id: int) -> str | None:
    """Where the processor's ids of the rendered _PROBE (tokenised whole, special tokens added unless the render
    starts with bos, as apply_chat_template does; image runs of 2) first differ from `encoder`'s, None where they
    are equal. They differ where the tokenizer does not split at the pieces the encoder tokenises apart (a
    SentencePiece prefix space) or adds a bos the template has not."""
    turns = _PROBE[:1] if encoder.template.single_turn else _PROBE
    messages = [dict(role="user" if role == "human" else "assistant",
                     content=([dict(type="image")] if IMAGE_MARKER in q else []) +
                     [dict(type="text", text=q.replace(IMAGE_MARKER + "\n", ""))]) for role, q in turns]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template_text, tokenize=False,
                                             add_generation_prompt=True)
    bos = tokenizer.bos_token
    got = tokenizer(rendered.replace(image_token, image_token * 2),
                    add_special_tokens=not (bos and rendered.startswith(bos)))["input_ids"]
    if encoder.template.image_prefix:
        got = [image_id] * 2 + got
    want = [image_id if t == encoder.image_id else int(t) for t in encoder.encode_prompt(turns, [2], "probe")[0].tokens]
    if got == want:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"at token {at}: {tokenizer.convert_ids_to_tokens(got[at:at + 3])} against "
            f"{tokenizer.convert_ids_to_tokens(want[at:at + 3])}")


def write_serving_files(dst: str, family: str, hf_config: dict[str, Any], config: ml_collections.ConfigDict,
                        tokenizer: PreTrainedTokenizerBase) -> None:
    """Writes the tokenizer, processor, chat template and generation config of `family` (IMAGE_TOKENS) into `dst`,
    beside config.json `hf_config`, from the run config `config` (its data.template, data.system and image
    settings) and the tokenizer the model was run with."""
    template = get_template(config.data.template)
    if family == "blip2" and not template.image_prefix:
        raise InputError(f"data.template {template.name!r} puts image runs where their markers stand, but "
                         "transformers' Blip2Processor puts them before the text: a BLIP-2 export needs a template "
                         "with image_prefix (ziya)")
    if family != "blip2" and template.image_prefix:
        raise InputError(f"data.template {template.name!r} puts image runs before the text, as only transformers' "
                         f"Blip2Processor does; the {family} processor puts them where its image token stands")
    if data_kind(config.model).name == "tiles" and config.data.max_tiles > 1:
        logging.warning("export: data.max_tiles=%d tiles each image into several views, transformers' %s processor "
                        "gives it one: served through transformers, this model sees its images otherwise",
                        config.data.max_tiles, family)
    text, key = IMAGE_TOKENS[family]
    vocab = hf_config["text_config"]["vocab_size"]
    if not 0 <= hf_config[key] < vocab:
        raise InputError(f"config.json's {key} {hf_config[key]} lies outside the model's {vocab} embedding rows: "
                         f"export with --image_token_index set to one of them (the tokenizer's {text})")
    config = config.copy_and_resolve_references()
    config.data.image_token_id = hf_config[key]  # the export's placeholder, where the run config names none
    encoder = make_encoder(config, tokenizer)
    stop_id = encoder.stop_id
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _with_image_token(tokenizer, text, hf_config[key], os.path.join(scratch, "tokenizer"), key)
        spec, image_processor = _image_processor(family, config, scratch)
        template_text = chat_template(template, config.data.system, text)
        difference = _probe(encoder, tokenizer, template_text, text, hf_config[key])
        if difference:
            logging.warning("export: transformers tokenises this tokenizer's render of data.template %r otherwise "
                            "than vlm_jax encodes it (%s): served prompts differ from vlm_jax's", template.name,
                            difference)
        tokenizer.chat_template = template_text  # over any the source's tokenizer carried
        legacy = os.path.join(dst, LEGACY_TEMPLATE_FILE)
        if os.path.exists(legacy):  # a copied source's: transformers would read it before ours
            os.remove(legacy)
        if family == "llava":
            processor = transformers.LlavaProcessor(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=template_text,
                patch_size=hf_config["vision_config"]["patch_size"],
                vision_feature_select_strategy=hf_config["vision_feature_select_strategy"],
                num_additional_image_tokens=1)  # CLIP's class token
            processor.save_pretrained(dst)
        elif family == "blip2":
            processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                    num_query_tokens=hf_config["num_query_tokens"])
            processor.save_pretrained(dst)
        else:
            _save_qwen2_vl_processor(dst, tokenizer, spec)
        # Blip2Processor drops the template it is given; the file is where every class finds it.
        with open(os.path.join(dst, CHAT_TEMPLATE_FILE), "w") as f:
            f.write(template_text)
    with open(os.path.join(dst, PREPROCESSOR_FILE), "w") as f:
        json.dump(spec, f, indent=2)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_id
    transformers.GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_id, pad_token_id=pad_id,
                                  do_sample=False).save_pretrained(dst)


def _save_qwen2_vl_processor(dst: str, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> None:
    """Qwen2VLProcessor's files, written without building it: transformers builds its video processor only with
    torchvision installed; the video processor takes the image settings."""
    tokenizer.save_pretrained(dst)
    video = {k: spec[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                                  "image_mean", "image_std")} | dict(video_processor_type="Qwen2VLVideoProcessor")
    with open(os.path.join(dst, "processor_config.json"), "w") as f:
        json.dump(dict(processor_class="Qwen2VLProcessor", image_processor=spec, video_processor=video), f, indent=2)
