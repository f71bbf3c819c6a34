"""Seconds per fine-tuning step on this machine's CPU, for the README's "expected times": the bundled
demo model and GPT-2 124M's shapes (random weights: the same arithmetic as `--model gpt2`, no
download), batch 1, at the block sizes the README's recipes use. One process, arms interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/first_hour.py
"""

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from botkit.model.loading import load_model

NUM_STEPS = 4


def seconds_per_step(model, block: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, model.config.vocab_size, (1, block))
    times = []
    for step in range(NUM_STEPS + 1):
        started = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    demo = load_model(None, device="cpu", dtype="float32").model
    gpt2 = GPT2LMHeadModel(GPT2Config())  # 124M
    arms = [
        ("demo (4 layers, 256 wide), block 256", demo, 256),
        ("gpt2 124M, block 128", gpt2, 128),
        ("gpt2 124M, block 256", gpt2, 256),
        ("gpt2 124M, block 1024", gpt2, 1024),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, model, block in arms:
        print(f"{name}: {seconds_per_step(model, block):.2f} s/step (median of {NUM_STEPS})", flush=True)


if __name__ == "__main__":
    main()
