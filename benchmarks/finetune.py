"""Training speed of `botkit.finetune` vs a plain PyTorch loop: same GPT-2 124M shapes (random
weights), same batch shapes, same optimizer, CPU, float32.

    python benchmarks/finetune.py --quick      # about 2 minutes on 2 idle cores
    python benchmarks/finetune.py              # more steps

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def model_config():
    from transformers import GPT2Config

    return GPT2Config()  # 124M: 12 layers, width 768, 12 heads, 1024 positions, 50,257 tokens


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
    from botkit.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(args.data, model=model_config(), steps=args.steps, batch_size=args.batch, block_size=args.block,
                          learning_rate=1e-4, sample_every=0, save_every=args.steps, progress=False, run_name="bench",
                          checkpoint_dir=tmp, device="cpu")
        rows = list(csv.DictReader((result.run_dir / "loss.csv").read_text().splitlines()))
    rates = [float(r["tokens_per_s"]) for r in rows]
    return {"tokens_per_s": statistics.median(rates[args.warmup :]), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4+1 steps per loop instead of 12+2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--mode", choices=["plain", "plain_fused", "botkit"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (5 if args.quick else 14)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.mode:
        print(json.dumps((run_botkit if args.mode == "botkit" else run_plain)(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npz"
        from botkit.datasets import tokenizer_fingerprint
        from botkit.models import gpt2_tokenizer

        tokens = np.random.default_rng(0).integers(0, 50257, size=200_000).astype(np.uint16)
        np.savez(data, tokens=tokens, tokenizer=tokenizer_fingerprint(gpt2_tokenizer()))
        results = {}
        for mode in ("plain", "botkit", "plain_fused"):
            cmd = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--batch", str(args.batch), "--block", str(args.block),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            started = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:11s}: {results[mode]['tokens_per_s']:8.1f} tokens/s, peak RSS {results[mode]['peak_rss_mb']:7.0f} MB "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    summary = {
        "benchmark": "finetune GPT-2 124M shapes, random weights, CPU float32",
        "batch": args.batch, "block": args.block, "steps": args.steps, "warmup_steps": args.warmup,
        "ratio_vs_plain": round(results["botkit"]["tokens_per_s"] / results["plain"]["tokens_per_s"], 3),
        "botkit_tokens_per_s": round(results["botkit"]["tokens_per_s"], 1),
        "plain_tokens_per_s": round(results["plain"]["tokens_per_s"], 1),
        "peak_rss_mb": round(results["botkit"]["peak_rss_mb"]),
        "plain_peak_rss_mb": round(results["plain"]["peak_rss_mb"]),
        "ratio_vs_plain_fused_adamw": round(results["botkit"]["tokens_per_s"] / results["plain_fused"]["tokens_per_s"], 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
