"""Training speed of `botkit.finetune` vs a plain PyTorch loop: same GPT-2 124M shapes (random
weights), same batch shapes, same optimizer, CPU, float32.

    python benchmarks/finetune.py --quick      # about 2 minutes on 2 idle cores
    python benchmarks/finetune.py              # more steps
    python benchmarks/finetune.py --lora --quick    # full vs LoRA: 124M and 355M shapes, CPU (~15 min of CPU)
    python benchmarks/finetune.py --lora --device cuda --shapes 774M,1558M --batch 1 --block 1024   # on a GPU

`--lora` compares full fine-tuning with LoRA (rank 16 on c_attn, c_proj, c_fc) and LoRA with
gradient checkpointing, all through `botkit.finetune` at the same batch, per model shape (random
weights saved to a temporary folder first: LoRA adapts a saved model). Peak memory is the training
process's resident set on CPU (sampled every 20 ms until the last step is logged, so the checkpoint
written after the loop is left out) and `torch.cuda.max_memory_allocated` on a GPU.

Each loop runs in its own process, so each peak RSS is its own. Tokens/s is the median over the
timed steps (the first `--warmup` steps are left out). botkit's loop also clips gradients, keeps the
loss log and its average, and writes a checkpoint at the end (after timing); it uses fused AdamW,
so a third run, the plain loop with `fused=True`, shows how much of the difference that is. The last line is one
JSON object. On a shared machine the figures move with the other load; the ratio matters more.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # GPT-2 sizes by gpt-2-simple's names: layers, width, heads (1024 positions, 50,257 tokens)
    "124M": dict(n_layer=12, n_embd=768, n_head=12),
    "355M": dict(n_layer=24, n_embd=1024, n_head=16),
    "774M": dict(n_layer=36, n_embd=1280, n_head=20),
    "1558M": dict(n_layer=48, n_embd=1600, n_head=25),
}
LORA_ARMS = ("full", "lora", "lora_gc")


def model_config(shape: str = "124M"):
    from transformers import GPT2Config

    return GPT2Config(**SHAPES[shape])


def run_plain(args) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(model_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.mode == "plain_fused")
    tokens = np.load(args.data)["tokens"].astype(np.int64)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(args.steps):
        started = time.perf_counter()
        starts = rng.integers(0, len(tokens) - args.block + 1, size=args.batch)
        x = torch.from_numpy(tokens[starts[:, None] + np.arange(args.block)])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        rates.append(args.batch * args.block / (time.perf_counter() - started))
    return {"tokens_per_s": statistics.median(rates[args.warmup :]), "peak_rss_mb": peak_rss_mb()}


def run_botkit(args) -> dict:
    from botkit.train.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(
            args.data,
            model=model_config(),
            steps=args.steps,
            batch_size=args.batch,
            block_size=args.block,
            learning_rate=1e-4,
            sample_every=0,
            save_every=args.steps,
            progress=False,
            run_name="bench",
            checkpoint_dir=tmp,
            device="cpu",
        )
        rows = list(csv.DictReader((result.run_dir / "loss.csv").read_text().splitlines()))
    rates = [float(r["tokens_per_s"]) for r in rows]
    return {"tokens_per_s": statistics.median(rates[args.warmup :]), "peak_rss_mb": peak_rss_mb()}


def run_lora_arm(args) -> dict:
    """One arm of --lora in this process: full, lora or lora_gc fine-tuning of the saved model args.base."""
    import threading

    import psutil
    import torch

    from botkit.train.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        loss_csv = Path(tmp) / "bench" / "loss.csv"
        peak, done = [0], threading.Event()

        def sample() -> None:  # resident set until the last step's row is written (before the final checkpoint)
            proc = psutil.Process()
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                if loss_csv.is_file() and len(loss_csv.read_text().splitlines()) > args.steps:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = finetune(
            args.data,
            model=args.base,
            steps=args.steps,
            batch_size=args.batch,
            block_size=args.block,
            learning_rate=1e-4,
            lora=args.rank if args.mode.startswith("lora") else 0,
            gradient_checkpointing=args.mode.endswith("_gc"),
            sample_every=0,
            save_every=args.steps,
            progress=False,
            run_name="bench",
            checkpoint_dir=tmp,
            device=args.device,
        )
        done.set()
        sampler.join()
        rows = list(csv.DictReader((result.run_dir / "loss.csv").read_text().splitlines()))
    rates = [float(r["tokens_per_s"]) for r in rows]
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return {
        "tokens_per_s": statistics.median(rates[args.warmup :]),
        "peak_rss_mb": peak[0] / 2**20,
        "peak_gpu_mb": gpu_mb,
    }


def lora_comparison(args) -> None:
    """--lora: full vs LoRA vs LoRA + gradient checkpointing per shape, each arm in its own process."""
    from botkit.model.loading import gpt2_tokenizer
    from botkit.train.encoding import tokenizer_fingerprint

    summary = {
        "benchmark": f"finetune full vs LoRA r{args.rank}, random weights, {args.device}",
        "batch": args.batch,
        "block": args.block,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "shapes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npz"
        np.savez(
            data,
            tokens=np.random.default_rng(0).integers(0, 50257, size=200_000).astype(np.uint16),
            tokenizer=tokenizer_fingerprint(gpt2_tokenizer()),
        )
        for shape in args.shapes.split(","):
            base = Path(tmp) / shape
            subprocess.run([sys.executable, __file__, "--save-shape", shape, "--base", str(base)], check=True)
            arms = {}
            for mode in LORA_ARMS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--mode",
                    mode,
                    "--data",
                    str(data),
                    "--base",
                    str(base),
                    "--batch",
                    str(args.batch),
                    "--block",
                    str(args.block),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--rank",
                    str(args.rank),
                    "--device",
                    args.device,
                ]
                started = time.perf_counter()
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
                )
                arms[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                gpu = f", peak GPU {arms[mode]['peak_gpu_mb']:7.0f} MB" if arms[mode]["peak_gpu_mb"] is not None else ""
                print(
                    f"{shape:5s} {mode:8s}: {arms[mode]['tokens_per_s']:8.1f} tokens/s, peak RSS "
                    f"{arms[mode]['peak_rss_mb']:7.0f} MB{gpu} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            shutil.rmtree(base)
            summary["shapes"][shape] = {
                mode: {k: round(v, 1) for k, v in arm.items() if v is not None} for mode, arm in arms.items()
            }
    summary["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


def save_shape(shape: str, folder: str) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from botkit.model.loading import gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(model_config(shape)).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4+1 steps per loop instead of 12+2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--lora", action="store_true", help="compare full fine-tuning with LoRA (and LoRA + gradient checkpointing)"
    )
    p.add_argument("--shapes", default="124M,355M", help="--lora: model shapes, from " + ", ".join(SHAPES))
    p.add_argument("--rank", type=int, default=16, help="--lora: LoRA rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--lora: where to train")
    p.add_argument("--mode", choices=["plain", "plain_fused", "botkit", *LORA_ARMS], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--save-shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (5 if args.quick else 14)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.save_shape:
        return save_shape(args.save_shape, args.base)
    if args.mode in LORA_ARMS:
        print(json.dumps(run_lora_arm(args)))
        return
    if args.mode:
        print(json.dumps((run_botkit if args.mode == "botkit" else run_plain)(args)))
        return
    if args.lora:
        return lora_comparison(args)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npz"
        from botkit.model.loading import gpt2_tokenizer
        from botkit.train.encoding import tokenizer_fingerprint

        tokens = np.random.default_rng(0).integers(0, 50257, size=200_000).astype(np.uint16)
        np.savez(data, tokens=tokens, tokenizer=tokenizer_fingerprint(gpt2_tokenizer()))
        results = {}
        for mode in ("plain", "botkit", "plain_fused"):
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--data",
                str(data),
                "--batch",
                str(args.batch),
                "--block",
                str(args.block),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            started = time.perf_counter()
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{mode:11s}: {results[mode]['tokens_per_s']:8.1f} tokens/s, peak RSS "
                f"{results[mode]['peak_rss_mb']:7.0f} MB "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    summary = {
        "benchmark": "finetune GPT-2 124M shapes, random weights, CPU float32",
        "batch": args.batch,
        "block": args.block,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "ratio_vs_plain": round(results["botkit"]["tokens_per_s"] / results["plain"]["tokens_per_s"], 3),
        "botkit_tokens_per_s": round(results["botkit"]["tokens_per_s"], 1),
        "plain_tokens_per_s": round(results["plain"]["tokens_per_s"], 1),
        "peak_rss_mb": round(results["botkit"]["peak_rss_mb"]),
        "plain_peak_rss_mb": round(results["plain"]["peak_rss_mb"]),
        "ratio_vs_plain_fused_adamw": round(
            results["botkit"]["tokens_per_s"] / results["plain_fused"]["tokens_per_s"], 3
        ),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
