"""PyTorch <-> vlm_jax checkpoints, and a parity check between them.

  vlm-convert import --src HF_OR_STATE_DICT_DIR --dst CKPT_DIR [--vision CLIP_DIR] [--family NAME]
                     [--param_dtype bfloat16]
  vlm-convert import --src ZIYA_LLAMA_DIR --vision ZIYA_VISUAL_DIR --vision_family blip2_visual --dst CKPT_DIR
  vlm-convert import --src PEFT_ADAPTER_DIR --base CKPT_DIR|WORKDIR[@STEP] --dst CKPT_DIR
  vlm-convert import --family xverse_v --src adapter_and_lora.bin --base CKPT_DIR --dst CKPT_DIR
  vlm-convert export --src CKPT_DIR|WORKDIR[@STEP] --dst DIR --format hf|original|peft|xverse_v
  vlm-convert check  --src HF_DIR [--family NAME] [--seed N] [--image IMG [--question TEXT]]

Every command also takes --config FILE (default configs/base.py: its mesh holds the weights, its model settings
fill in what a checkpoint does not say) with --config.KEY=VALUE overrides, and the multi-process flags.

Families: clip, llama, qwen2, llava (HF LlavaForConditionalGeneration), llava_original (the LLaVA /
ShareGPT4V state dict; its CLIP tower comes from --vision), qwen2_vl_vision (Qwen2-VL's NaViT tower + merger),
qwen2_vl (Qwen2VLForConditionalGeneration), points (a whole POINTS1.5 checkpoint; no transformers class, so no
check), blip2 (HF Blip2ForConditionalGeneration with a LLaMA language model: Ziya-BLIP2), blip2_visual (its
ViT + Q-Former + projection alone, with the LLM from --src), qwen1 (Qwen-7B/14B `transformer.h.*`, Belle-VL's LLM;
exports as Qwen2ForCausalLM), qwen_vl (a whole Qwen-VL / Belle-VL checkpoint, exported in the same layout; no
transformers class, so no check). An imported CKPT_DIR starts a training run
with --config.init_params=CKPT_DIR (params only, fresh optimizer).
`check` prints one JSON line: max_abs_diff, max_rel_diff, and the same per stage. With --image (LLaVA) the
model runs on that image and the question as a prompt, each side preprocessing the image itself (transformers'
processor of HF_DIR; vlm_jax's reading of its processor file), and pixel_max_abs_diff compares their pixels.
A LoRA checkpoint (model.lora.rank > 0) exports merged for hf/original, or as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) for peft, with what the run trained outside LoRA as
modules_to_save. Export writes back the source tensors an import carried (docs/contracts.md).
"""

import argparse
import json
import os

from vlm_jax import parallel
from vlm_jax.cli.args import parse, reported_errors
from vlm_jax.interop import peft, xverse_v
from vlm_jax.interop.check import DEFAULT_QUESTION, check
from vlm_jax.interop.hf_export import FORMATS, export_checkpoint
from vlm_jax.interop.hf_import import import_checkpoint
from vlm_jax.interop.keymap import ConversionError


def _import_arguments(imp: argparse.ArgumentParser) -> None:
    imp.add_argument("--src", required=True)
    imp.add_argument("--dst", required=True)
    imp.add_argument("--vision", default=None, help="separate vision part: a CLIP tower directory, or see "
                     "--vision_family")
    imp.add_argument("--vision_family", default="clip", help="how --vision is read: clip, or blip2_visual "
                     "(Ziya-BLIP2's ViT + Q-Former + projection)")
    imp.add_argument("--family", default=None, help="default: detected from config.json")
    imp.add_argument("--param_dtype", default=None, help="default: the checkpoint's dtype")
    imp.add_argument("--base", default=None, help="PEFT adapter import: the base model's vlm_jax checkpoint")


def _export_arguments(exp: argparse.ArgumentParser) -> None:
    exp.add_argument("--src", required=True)
    exp.add_argument("--dst", required=True)
    exp.add_argument("--format", choices=FORMATS, default="hf")
    exp.add_argument("--dtype", default=None, help="default: the checkpoint's param dtype")
    exp.add_argument("--shard_gb", type=float, default=5.0)
    exp.add_argument("--image_token_index", type=int, default=None,
                     help="LLaVA / BLIP-2 / Qwen2-VL export: default the source's, else the "
                     "tokenizer's image token, else a new row after the vocab")


def _check_arguments(chk: argparse.ArgumentParser) -> None:
    chk.add_argument("--src", required=True)
    chk.add_argument("--family", default=None)
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--image", default=None, help="an image file to run the model on (LLaVA)")
    chk.add_argument("--question", default=DEFAULT_QUESTION, help="with --image: the question of the prompt")


COMMANDS = {
    "import": ("PyTorch checkpoint -> vlm_jax params checkpoint", _import_arguments),
    "export": ("vlm_jax params checkpoint -> PyTorch checkpoint", _export_arguments),
    "check": ("PyTorch vs vlm_jax outputs on random inputs (one JSON line)", _check_arguments),
}


def main(argv: list[str] | None = None) -> None:
    args, config = parse(__doc__.splitlines()[0], argv, workdir=False, config_optional=True, commands=COMMANDS)
    mesh = parallel.make_mesh(config.mesh)
    with reported_errors():
        adapter = args.command == "import" and (args.family == "xverse_v" or
                                                os.path.isfile(os.path.join(args.src, peft.CONFIG_FILE)))
        if adapter and not args.base:
            raise ConversionError(f"{args.src} is an adapter: pass --base, the base model's checkpoint")
        if adapter:
            (xverse_v if args.family == "xverse_v" else peft).import_adapter(args.src, args.base, args.dst, mesh)
        elif args.command == "import":
            import_checkpoint(args.src, args.dst, config.model, mesh, family=args.family, vision=args.vision,
                              vision_family=args.vision_family, param_dtype=args.param_dtype)
        elif args.command == "export":
            export_checkpoint(args.src, args.dst, args.format, dtype=args.dtype,
                              shard_bytes=int(args.shard_gb * (1 << 30)), image_token_index=args.image_token_index)
        else:
            print(json.dumps(check(args.src, config.model, mesh, family=args.family, seed=args.seed,
                                   image=args.image, question=args.question)), flush=True)


if __name__ == "__main__":
    main()
