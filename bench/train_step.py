"""One training step of the peer LLaVA model (bench/peer.py) in vlm_jax and in transformers (torch eager), the
same weights and the same batch, timed interleaved in one run. Prints one JSON line.

  python bench/train_step.py [--batch 8 --seq_len 512 --steps 8 --warmup 2] [size flags of bench/peer.py]
                             [--compile_layers 2,32]

Every row holds one example: a 4-token prompt, the image's placeholder run, then text, the loss on the text after
the image. vlm_jax runs its own config (the import of the transformers model), Setup and jitted train step;
transformers runs LlavaForConditionalGeneration(labels=...) with torch.optim.AdamW and clip_grad_norm_, as its
Trainer does. Each side runs `--warmup` steps first (vlm_jax's first compiles), then the timed steps alternate
between the two, the first side swapping every round. `loss_first_step_*`: the loss each side computed on the
first step, the same model on the same batch. `ratio_vs_hf`: vlm_jax tokens/s over transformers'.
`rss_ratio_vs_hf`: the two workers' peak resident set sizes. With `--compile_layers A,B` the vlm_jax step is also
compiled (not run) at A and at B decoder layers, each in a fresh process: `compile_s`, and `compile_ratio` B / A.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import peer  # noqa: E402

PROMPT = 4  # tokens before the image


def make_batch(a: argparse.Namespace) -> dict[str, np.ndarray]:
    """The shared batch: token ids, the loss positions (on the token predicted) and NCHW pixels."""
    rng = np.random.default_rng(0)
    image = peer.image_tokens(a)
    if a.seq_len <= PROMPT + image + 1:
        raise SystemExit(f"--seq_len {a.seq_len} leaves no text after {image} image tokens")
    tokens = rng.integers(2, peer.image_token(a) - 1, size=(a.batch, a.seq_len)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[:, PROMPT:PROMPT + image] = peer.image_token(a)
    loss = np.zeros((a.batch, a.seq_len), bool)
    loss[:, PROMPT + image + 1:] = True  # the text after the image, its first token given
    pixels = rng.standard_normal((a.batch, 3, a.image_size, a.image_size)).astype(np.float32)
    return dict(tokens=tokens, loss=loss, pixels=pixels)


def torch_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    data = dict(np.load(a.batch_file))
    model = peer.hf_model(a).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peer.LR, weight_decay=0.0)
    tokens = torch.from_numpy(data["tokens"]).long()
    labels = torch.where(torch.from_numpy(data["loss"]), tokens, torch.full_like(tokens, -100))
    pixels = torch.from_numpy(data["pixels"])

    def step(_: str) -> dict:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {"s": time.perf_counter() - start, "loss": float(loss)}

    peer.serve(lambda: {"params": sum(p.numel() for p in model.parameters())}, {"step": step})


def vlm_state(a: argparse.Namespace, ckpt: str):
    """(Setup, state, jitted step) of the imported peer on one device."""
    import jax

    from vlm_jax.train.loop import Setup
    from vlm_jax.train.step import make_train_step

    config = peer.vlm_config(a, a.hf_dir, ckpt, a.seq_len, a.batch)
    setup = Setup(config, jax.devices()[:1])
    state = setup.imported_state(ckpt)
    return setup, state, make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)


def vlm_batch(a: argparse.Namespace, setup, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from vlm_jax.data.packing import Example
    from vlm_jax.data.pipeline import row_layout

    layout = row_layout(setup.config)
    batch = layout.empty(a.batch)
    for r in range(a.batch):
        tiles = data["pixels"][r].transpose(1, 2, 0)[None]
        layout.write(batch, r, [Example(str(r), data["tokens"][r], data["loss"][r], tiles, np.array([PROMPT]))])
    return batch


def jax_worker(a: argparse.Namespace) -> None:
    import jax

    from vlm_jax import parallel

    data = dict(np.load(a.batch_file))
    setup, state, train_step = vlm_state(a, os.path.join(os.path.dirname(a.batch_file), "vlm_jax"))
    host = vlm_batch(a, setup, data)
    holder = {"state": state}

    def step(_: str) -> dict:
        start = time.perf_counter()
        state, metrics = train_step(holder["state"], parallel.global_batch(host, setup.mesh))
        loss = float(metrics["loss"])  # waits for the step
        jax.block_until_ready(state)
        holder["state"] = state
        return {"s": time.perf_counter() - start, "loss": loss}

    peer.serve(lambda: {"params": sum(x.size for x in jax.tree.leaves(state.params))}, {"step": step})


def compile_worker(a: argparse.Namespace) -> None:
    """Compiles (does not run) the vlm_jax step of `--layers` decoder layers; answers its seconds."""
    import jax

    from vlm_jax.train.plan import abstract_batch

    def setup() -> dict:
        from vlm_jax.train.loop import Setup
        from vlm_jax.train.step import make_train_step

        config = peer.vlm_config(a, a.hf_dir, os.path.join(os.path.dirname(a.batch_file), "vlm_jax"), a.seq_len,
                                 a.batch)
        config.model.text.layers = a.layers
        s = Setup(config, jax.devices()[:1])
        run = make_train_step(s.model, s.optimizer, s.mesh, s.state_shardings)
        start = time.perf_counter()
        with jax.set_mesh(s.mesh):
            run.jitted.lower(s.abstract_state, abstract_batch(config, s.state_shardings.step)).compile()
        return {"compile_s": time.perf_counter() - start}

    peer.serve(setup, {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peer.add_size_flags(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    p.add_argument("--compile_layers", default="", help="A,B: also time the step's compile at A and B layers")
    p.add_argument("--worker", choices=("jax", "torch", "compile"), help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    p.add_argument("--batch_file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        {"jax": jax_worker, "torch": torch_worker, "compile": compile_worker}[a.worker](a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, batch_file = os.path.join(tmp, "hf"), os.path.join(tmp, "batch.npz")
        peer.write_hf(a, hf_dir)
        np.savez(batch_file, **make_batch(a))
        argv = [*peer.size_argv(a), f"--batch={a.batch}", f"--seq_len={a.seq_len}", "--hf_dir", hf_dir,
                "--batch_file", batch_file]
        workers = {name: peer.Worker(__file__, ["--worker", name, *argv]) for name in ("torch", "jax")}
        times = {name: [] for name in workers}
        first = {name: workers[name].call("step")["loss"] for name in workers}
        for _ in range(a.warmup - 1):
            for w in workers.values():
                w.call("step")
        order = list(workers)
        for _ in range(a.steps):
            for name in order:
                times[name].append(workers[name].call("step")["s"])
            order.reverse()
        rss = {name: w.close()["peak_rss_gib"] for name, w in workers.items()}
        compile_s = {}
        for layers in [int(x) for x in a.compile_layers.split(",") if x]:
            w = peer.Worker(__file__, ["--worker", "compile", *argv, f"--layers={layers}"])
            compile_s[layers] = round(w.ready["compile_s"], 2)
            w.close()
    tokens = a.batch * a.seq_len
    s = {name: statistics.median(t) for name, t in times.items()}
    out = dict(
        step_s_vlm_jax=s["jax"], step_s_hf=s["torch"], tokens_per_s_vlm_jax=tokens / s["jax"],
        tokens_per_s_hf=tokens / s["torch"], ratio_vs_hf=s["torch"] / s["jax"],
        peak_rss_gib_vlm_jax=rss["jax"], peak_rss_gib_hf=rss["torch"], rss_ratio_vs_hf=rss["jax"] / rss["torch"],
        loss_first_step_vlm_jax=first["jax"], loss_first_step_hf=first["torch"], params=workers["jax"].ready["params"],
        batch=a.batch, seq_len=a.seq_len, steps=a.steps, host_cpus=os.cpu_count())
    if compile_s:
        (lo, lo_s), (hi, hi_s) = sorted(compile_s.items())[0], sorted(compile_s.items())[-1]
        out.update(compile_s=compile_s, compile_ratio=round(hi_s / lo_s, 3))
    print(json.dumps(peer.rounded(out)))


if __name__ == "__main__":
    main()
