"""Import/export speed and peak memory for a random HF LLaMA written to local disk (default ~1.1 B params,
TinyLlama shape). Prints one JSON line.

  python bench/convert.py [--layers 22 --hidden 2048 --ffn 5632 --heads 32 --kv_heads 4 --vocab 32000]
                          [--dir /tmp/vlm_jax_bench]

Each phase runs in its own process so each peak resident set size is that phase's alone.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def _write_model(a: argparse.Namespace, path: str) -> int:
    """A random LLaMA as HF safetensors shards, generated one tensor at a time."""
    import numpy as np

    from vlm_jax.interop.torch_files import write_safetensors

    kv = a.kv_heads * (a.hidden // a.heads)
    shapes = {"model.embed_tokens.weight": (a.vocab, a.hidden), "model.norm.weight": (a.hidden,),
              "lm_head.weight": (a.vocab, a.hidden)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (a.hidden,), p + "post_attention_layernorm.weight": (a.hidden,),
                   p + "self_attn.q_proj.weight": (a.hidden, a.hidden), p + "self_attn.k_proj.weight": (kv, a.hidden),
                   p + "self_attn.v_proj.weight": (kv, a.hidden), p + "self_attn.o_proj.weight": (a.hidden, a.hidden),
                   p + "mlp.gate_proj.weight": (a.ffn, a.hidden), p + "mlp.up_proj.weight": (a.ffn, a.hidden),
                   p + "mlp.down_proj.weight": (a.hidden, a.ffn)}
    rng = np.random.default_rng(0)
    os.makedirs(path)
    write_safetensors(path, {n: (s, np.float32) for n, s in shapes.items()},
                      ((n, rng.standard_normal(s, np.float32) * 0.02) for n, s in shapes.items()), 2 << 30)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=a.vocab, hidden_size=a.hidden,
                  intermediate_size=a.ffn, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0, dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(int(np.prod(s)) for s in shapes.values())


def _phase(argv: list[str]) -> dict:
    """Runs `bench/convert.py --phase ...` in a child; returns its seconds and peak RSS."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 22), ("hidden", 2048), ("ffn", 5632), ("heads", 32), ("kv_heads", 4),
                          ("vocab", 32000)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dir", default="/tmp/vlm_jax_bench")
    p.add_argument("--phase", choices=("write", "import", "export"), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    hf, ckpt, out = (os.path.join(a.dir, n) for n in ("hf", "ckpt", "export"))
    if a.phase:
        start = time.perf_counter()
        extra = {}
        if a.phase == "write":
            extra["params"] = _write_model(a, hf)
        else:
            from launch.convert import main as convert
            convert(["import", "--src", hf, "--dst", ckpt] if a.phase == "import" else
                    ["export", "--src", ckpt, "--dst", out, "--format", "hf"])
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
        print(json.dumps(dict(seconds=round(time.perf_counter() - start, 2), peak_rss_gb=round(peak_gb, 3), **extra)))
        return
    shutil.rmtree(a.dir, ignore_errors=True)
    sizes = [f"--{k}={getattr(a, k)}" for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")]
    written = _phase([*sizes, "--dir", a.dir, "--phase", "write"])
    disk_gb = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf)) / (1 << 30)
    imported = _phase([*sizes, "--dir", a.dir, "--phase", "import"])
    exported = _phase([*sizes, "--dir", a.dir, "--phase", "export"])
    print(json.dumps(dict(
        params=written["params"], model_disk_gb=round(disk_gb, 3), import_s=imported["seconds"],
        import_peak_rss_gb=imported["peak_rss_gb"], export_s=exported["seconds"],
        export_peak_rss_gb=exported["peak_rss_gb"], host_cpus=os.cpu_count())))
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
