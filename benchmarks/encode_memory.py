"""Peak memory of encoding a `.txt` dataset (issue 12, bug 4), for generated text of 20 MB and 200 MB:
`encode` is `botkit encode` (text to the .npz cache), `load` is what `botkit finetune` does with the
text, `cache` what it does with the .npz.

    python benchmarks/encode_memory.py                 # 20 MB and 200 MB (~8 min on 2 busy cores)
    python benchmarks/encode_memory.py --sizes-mb 20   # one size

Each measurement runs in its own process: it imports botkit and loads the bundled GPT-2 tokenizer,
resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), encodes, then reads the peak
(`VmHWM`). The figure is that peak above the RSS just before encoding, divided by the size of the
final token array (int32, 4 bytes per token). Goal: <= 2. Memory, not time, is measured, so a busy
machine does not change the figures. The text is seeded: English-like words, sentences and lines
(about 4.3 characters per GPT-2 token). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is was that for on with as by at from his her they have not this are but had which "
         "one all were when we there can an your more so said what about if out up into them some could time "
         "would other like then these two may first any well new because people way even good only very after "
         "channel server message tonight anyone again really think maybe game weekend pizza music lol yeah ok").split()


def write_text(path: Path, size_mb: int, seed: int = 0) -> None:
    """`size_mb` MB of seeded English-like lines, written in pieces (the generator holds no whole copy)."""
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < target:
            lines = []
            for _ in range(1000):
                words = rng.choices(WORDS, k=rng.randint(3, 25))
                lines.append(" ".join(words).capitalize() + rng.choice(".?!") + ("\n\n" if rng.random() < 0.1 else "\n"))
            block = "".join(lines)
            f.write(block)
            written += len(block)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, path: str) -> dict:
    """In a child process: peak RSS above the starting RSS while `mode` runs on `path`."""
    import numpy as np

    from botkit.datasets import encode_dataset, load_tokens
    from botkit.models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.backend_tokenizer.encode_batch(["warm up the tokenizer's thread pool"] * 4)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.npz"
        if mode == "cache":  # written before measuring: this mode measures fine-tuning from it
            encode_dataset(path, tokenizer, cache)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before_kb = status_kb("VmRSS")
        started = time.perf_counter()
        if mode == "encode":
            stream = encode_dataset(path, tokenizer, cache)
        else:
            stream = load_tokens(cache if mode == "cache" else path, tokenizer)
    seconds = time.perf_counter() - started
    peak_kb = status_kb("VmHWM")
    num_tokens = len(stream)
    array_mb = num_tokens * np.dtype(np.int32).itemsize / 1e6
    extra_mb = (peak_kb - before_kb) * 1024 / 1e6
    return {"mode": mode, "num_tokens": num_tokens, "token_array_mb": round(array_mb, 1), "peak_extra_mb": round(extra_mb, 1),
            "ratio": round(extra_mb / array_mb, 2), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--modes", nargs="+", default=["encode", "load", "cache"], choices=["encode", "load", "cache"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_mb in args.sizes_mb:
            path = Path(tmp) / f"text-{size_mb}mb.txt"
            write_text(path, size_mb)
            for mode in args.modes:
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{mode} on {size_mb} MB failed:\n{out.stderr[-3000:]}")
                result = {"text_mb": size_mb, **json.loads(out.stdout.strip().splitlines()[-1])}
                print(f"{size_mb:>5} MB text, {mode:<6}: {result['num_tokens']:>11,} tokens ({result['token_array_mb']} MB as int32), "
                      f"peak +{result['peak_extra_mb']} MB = {result['ratio']}x the token array, {result['seconds']} s", flush=True)
                results.append(result)
    worst = max(r["ratio"] for r in results)
    print(json.dumps({"worst_ratio": worst, "goal": 2.0, "met": worst <= 2.0, "results": results}))


if __name__ == "__main__":
    main()
