"""Peak memory of encoding a `.txt` dataset (issue 12, bug 4), for generated text of 20 MB and 200 MB:
`encode` is `botkit encode` (text to the .npz cache), `load` is what `botkit finetune` does with the
text, `cache` what it does with the .npz. `index` is the copy index `botkit finetune` writes
(botkit.engine.copy_index.write_index, bounded by MAX_BUILD_BYTES, not by the 2x goal) and the time of one
`check_copying` against it.

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

MODES = ["encode", "load", "cache", "index"]
WORDS = (
    "the of and to in is was that for on with as by at from his her they have not this are but had which "
    "one all were when we there can an your more so said what about if out up into them some could time "
    "would other like then these two may first any well new because people way even good only very after "
    "channel server message tonight anyone again really think maybe game weekend pizza music lol yeah ok"
).split()


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
                lines.append(
                    " ".join(words).capitalize() + rng.choice(".?!") + ("\n\n" if rng.random() < 0.1 else "\n")
                )
            block = "".join(lines)
            f.write(block)
            written += len(block)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, path: str, cache: str) -> dict:
    """In a child process: peak RSS above the starting RSS while `mode` runs on `path`."""
    import numpy as np

    from botkit.engine.copy_index import check_copying, write_index
    from botkit.model.loading import gpt2_tokenizer
    from botkit.train.encoding import encode_dataset, load_tokens

    tokenizer = gpt2_tokenizer()
    tokenizer.backend_tokenizer.encode_batch(["warm up the tokenizer's thread pool"] * 4)
    if mode in ("cache", "index") and not Path(cache).is_file():  # not measured: these modes start from it
        encode_dataset(path, tokenizer, cache)
    tokens = load_tokens(cache, tokenizer).tokens if mode == "index" else None
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before_kb = status_kb("VmRSS")
        started = time.perf_counter()
        if mode == "encode":
            num_tokens = len(encode_dataset(path, tokenizer, cache))
        elif mode == "index":
            index_path = write_index(tmp, tokens, tokenizer.eos_token_id)
            num_tokens = len(tokens)
        else:
            num_tokens = len(load_tokens(cache if mode == "cache" else path, tokenizer))
        seconds = time.perf_counter() - started
        peak_kb = status_kb("VmHWM")  # before the checks: they map the index file, whose pages then count as RSS
        if mode == "index":
            extra = {"index_mb": round(index_path.stat().st_size / 1e6, 1), **_check_speed(tmp, tokens, check_copying)}
    array_mb = num_tokens * np.dtype(np.int32).itemsize / 1e6
    extra_mb = (peak_kb - before_kb) * 1024 / 1e6
    return {
        "mode": mode,
        "num_tokens": num_tokens,
        "token_array_mb": round(array_mb, 1),
        "peak_extra_mb": round(extra_mb, 1),
        "ratio": round(extra_mb / array_mb, 2),
        "seconds": round(seconds, 1),
        **extra,
    }


def _check_speed(run_dir: str, tokens, check_copying) -> dict:
    """Microseconds per `check_copying` of a 60-token reply against the memory-mapped index: half
    the replies are slices of the training text (copies), half random ids (not)."""
    import numpy as np

    from botkit.engine.copy_index import CopyIndex

    index = CopyIndex.load(run_dir)
    rng = np.random.default_rng(0)
    replies = [tokens[s : s + 60] for s in rng.integers(0, len(tokens) - 60, 200)] + list(
        rng.integers(0, 50_000, (200, 60))
    )
    started = time.perf_counter()
    copies = sum(check_copying(reply, index).is_copy for reply in replies)
    took = time.perf_counter() - started
    return {
        "check_us": round(took / len(replies) * 1e6),
        "copies_found": f"{copies}/{len(replies)} (200 slices of the text, 200 random)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "CACHE"), help=argparse.SUPPRESS)
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
                cache = Path(tmp) / f"text-{size_mb}mb.npz"
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(path), str(cache)], capture_output=True, text=True
                )
                if out.returncode:
                    sys.exit(f"{mode} on {size_mb} MB failed:\n{out.stderr[-3000:]}")
                result = {"text_mb": size_mb, **json.loads(out.stdout.strip().splitlines()[-1])}
                index = f", index {result['index_mb']} MB, check {result['check_us']} us" if mode == "index" else ""
                print(
                    f"{size_mb:>5} MB text, {mode:<6}: {result['num_tokens']:>11,} tokens "
                    f"({result['token_array_mb']} MB as int32), "
                    f"peak +{result['peak_extra_mb']} MB = {result['ratio']}x the token array, {result['seconds']} "
                    f"s{index}",
                    flush=True,
                )
                results.append(result)
    worst = max((r["ratio"] for r in results if r["mode"] != "index"), default=0.0)
    print(json.dumps({"worst_ratio": worst, "goal": 2.0, "met": worst <= 2.0, "results": results}))


if __name__ == "__main__":
    main()
