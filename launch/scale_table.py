"""Regenerate docs/scale.md: python launch/scale_table.py [--only SUBSTRING]

Runs launch/plan.py, one process at a time (each compile holds a whole real model's program), for every shipped
real stage on the slice it is meant for, and writes the table of what each needs per chip. `--only` replans the
rows whose config or topology contains SUBSTRING and keeps the others as docs/scale.md has them.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "scale.md")

# (config, topology): every real stage on the smallest standard slice it fits as shipped.
STAGES = (
    ("configs/sharegpt4v_7b.py:stage1", "v5p:2x2x2"),
    ("configs/sharegpt4v_7b.py:stage2", "v5p:2x2x2"),
    ("configs/sharegpt4v_13b.py:stage1", "v5p:2x2x4"),
    ("configs/sharegpt4v_13b.py:stage2", "v5p:2x2x4"),
    ("configs/points15_7b.py:stage1", "v5p:2x2x2"),
    ("configs/points15_7b.py:stage2", "v5p:2x2x2"),
    ("configs/xverse_v_13b.py:stage1", "v5e:4x4"),
    ("configs/xverse_v_13b.py:stage2", "v5e:4x4"),
    ("configs/ziya_blip2_14b.py:stage1", "v5p:2x2x1"),
    ("configs/ziya_blip2_14b.py:stage2", "v5p:2x2x1"),
    ("configs/belle_vl.py:stage1", "v5p:2x2x2"),
    ("configs/belle_vl.py:stage2", "v5p:2x2x2"),
)

HEADER = """# Scale: what every real stage needs per chip

Written by `python launch/scale_table.py` (each row is `python launch/plan.py --config CONFIG --topology SLICE`,
the config exactly as shipped): the train step compiled ahead of time for the slice through libtpu, on a CPU host,
with no weights allocated. Peak is XLA's per-chip figure for the compiled step (arguments + outputs not donated +
temporaries); HBM is the chip's. Model FLOPs per step are analytic (vlm_jax/train/flops.py): 6 per trained
parameter and token, 4 per frozen one a gradient flows through, 2 per frozen one forward only, plus attention.
Tokens per step are the LLM's (rows x sequence length). "Step at peak" is model FLOPs / (chips x the chip's
published peak bf16 rate): the step time at 100 % MFU (at 40 % MFU a step takes 2.5 times as long).

| system | stage | slice | mesh | batch / micro-batches | params | trainable | per-chip peak / HBM | tokens per step | model FLOPs per step | step at peak | compile |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def row(config: str, topology: str, r: dict) -> str:
    file, _, stage = config.partition(":")
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
    fits = "" if r["fits"] else " **does not fit**"
    return (f"| {os.path.basename(file)[:-3]} | {stage} | {topology} ({r['chips']} x {r['chip_kind']}) | {mesh} | "
            f"{r['batch_size']} / {r['micro_batches']} | {r['params'] / 1e9:.2f} B | {r['trainable_params'] / 1e9:.3f} B | "
            f"{gib(r['peak_bytes_per_chip'])} / {gib(r['hbm_bytes_per_chip'])}{fits} | {r['tokens_per_step']:,} | "
            f"{r['model_flops_per_step']:.3g} | {r['step_s_at_peak']:.2f} s | {r['compile_s']:.0f} s |")


def read_rows() -> dict[tuple[str, str], str]:
    """The rows docs/scale.md has now, by (config, topology) as the row names them."""
    if not os.path.exists(TABLE):
        return {}
    out = {}
    for config, topology in STAGES:
        file, _, stage = config.partition(":")
        prefix = f"| {os.path.basename(file)[:-3]} | {stage} | {topology} "
        with open(TABLE) as f:
            out.update({(config, topology): line.rstrip("\n") for line in f if line.startswith(prefix)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="replan only the rows whose config or topology contains this")
    args = parser.parse_args()
    kept = read_rows()
    lines = []
    for config, topology in STAGES:
        if args.only and args.only not in config and args.only not in topology and (config, topology) in kept:
            lines.append(kept[(config, topology)])
            continue
        cmd = [sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--config", config, "--topology", topology]
        print("+", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{config} on {topology} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        lines.append(row(config, topology, result))
    with open(TABLE, "w") as f:
        f.write(HEADER + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
