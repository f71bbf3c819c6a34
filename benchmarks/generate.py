"""Generation speed of `botkit.generate`: against transformers' `model.generate`, and its early stop.

GPT-2 124M shapes (`GPT2Config()`), random weights, fp32 on CPU. Two measurements, each a ratio of
arms run alternately within this process (the machine is shared, absolute figures drift):

1. Same work: greedy, `length` new tokens, `nsamples == batch_size` copies of one prompt, at batch 1
   and batch 8. Both arms stop only at end of text, so they generate the same tokens (the texts are
   compared). `ratio_vs_hf` = botkit tokens/s / transformers tokens/s; goal >= 1.0.
2. Early stop: seeded sampling (temperature 1, top_k 40; greedy on random weights repeats one token
   forever, so a `truncate` string could not be placed). A first, full-length run of each prompt gives
   its text; the `truncate` string is a token of that text at a chosen position k, so the sample ends
   there. botkit stops each sample at `truncate`; gpt-2-simple generates the full `length` and cuts.
   The full-length arm is run with botkit itself (same seeds, so the cut texts must equal the early-stop
   texts: checked) and with transformers' `model.generate`. Useful tokens are the tokens of the cut
   text, the same for every arm. `early_stop_speedup` = useful tokens/s of botkit's early stop / that
   of full length then cut with transformers; goal >= 2.
3. Long generation (full run, or `--long`): 2 samples of 1,500 new tokens each, past the 1024-token
   window, gpt-2-simple's defaults (temperature 0.7, top_k 0: no filter). Arms: this botkit, and
   botkit as it was before issue 15 (commit BEFORE, its `botkit/` folder taken from git into a temp
   dir and run in a subprocess on the same seeded model: every token decoded the whole reply again and
   the sampler sorted the 50,257-entry vocabulary). `long_speedup` = before's seconds / now's; goal >= 5.

Progress goes to stderr; the last stdout line is one JSON object with the figures.

    python benchmarks/generate.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config

import botkit
from botkit.model.loading import LoadedModel, load_model

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workload.jsonl"
BEFORE = "7c01292"  # main before issue 15's hot-path work
LONG = """
import sys, time, torch
from transformers import GPT2Config
import botkit
from botkit.model.loading import load_model
torch.set_grad_enabled(False)
lm = load_model(GPT2Config(), device="cpu", dtype="float32", seed=int(sys.argv[2]))
start = time.perf_counter()
texts = botkit.generate(lm, prefix=sys.argv[1], nsamples=2, batch_size=2, length=int(sys.argv[3]),
                        temperature=0.7, top_k=0, seed=1, return_as_list=True)
print(time.perf_counter() - start, sum(len(t) for t in texts))
"""


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_prompts(path: Path, lm: LoadedModel, count: int, lengths: list[int]) -> list[str]:
    """`count` prompts of the workload, each cut to a token length taken in turn from `lengths`."""
    texts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i, text in enumerate(texts[:count]):
        ids = lm.tokenizer(text).input_ids[: lengths[i % len(lengths)]]
        prompts.append(lm.tokenizer.decode(ids))
    return prompts


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def hf_generate(lm: LoadedModel, prompt: str, batch: int, length: int, **sampling) -> list[list[int]]:
    """transformers' generate on `batch` copies of `prompt`; the new tokens of each row, up to end of text."""
    enc = lm.tokenizer([prompt] * batch, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=length, pad_token_id=lm.eos_token_id, **sampling)
    rows = []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        rows.append(row[: row.index(lm.eos_token_id)] if lm.eos_token_id in row else row)
    return rows


def same_work(lm: LoadedModel, prompts: list[str], batch: int, length: int) -> dict:
    """Greedy, no early stop: botkit.generate vs model.generate on the same prompts, arms alternating."""
    seconds = {"botkit": 0.0, "hf": 0.0}
    num_tokens, num_mismatches = 0, 0
    for i, prompt in enumerate(prompts):

        def run_botkit(prompt=prompt):
            return botkit.generate(
                lm,
                prefix=prompt,
                nsamples=batch,
                batch_size=batch,
                length=length,
                temperature=0,
                include_prefix=False,
                return_as_list=True,
            )

        def run_hf(prompt=prompt):
            return hf_generate(lm, prompt, batch, length, do_sample=False)

        order = [("botkit", run_botkit), ("hf", run_hf)]
        results = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:
            results[name], dt = timed(fn)
            seconds[name] += dt
        # each row generated its tokens plus the end-of-text token if it stopped early: one forward pass each
        num_tokens += sum(min(length, len(row) + 1) for row in results["hf"])
        hf_texts = [lm.tokenizer.decode(row).lstrip("\n") for row in results["hf"]]
        num_mismatches += sum(a != b for a, b in zip(results["botkit"], hf_texts, strict=True))
        log(f"  batch {batch} prompt {i}: botkit {seconds['botkit']:.1f}s hf {seconds['hf']:.1f}s (cumulative)")
    result = {name: num_tokens / s for name, s in seconds.items()}
    log(
        f"batch {batch}: botkit {result['botkit']:.1f} tok/s, transformers {result['hf']:.1f} tok/s, "
        f"ratio {result['botkit'] / result['hf']:.2f}, {num_mismatches} text mismatches"
    )
    return {
        "botkit_tok_s": result["botkit"],
        "hf_tok_s": result["hf"],
        "ratio": result["botkit"] / result["hf"],
        "num_tokens": num_tokens,
        "num_text_mismatches": num_mismatches,
    }


def pick_truncate(lm: LoadedModel, text: str, k: int) -> tuple[str, str] | None:
    """A string that first occurs in `text` at (about) token k, and the text before it."""
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    for j in [*range(k, len(offsets)), *range(k - 1, 0, -1)]:
        start, end = offsets[j]
        piece = text[start:end]
        if len(piece.strip()) >= 3 and "\ufffd" not in piece and text.find(piece) == start:
            return piece, text[:start]
    return None


def early_stop(lm: LoadedModel, prompts: list[str], positions: list[int], length: int, seed: int) -> dict:
    """botkit's early stop at `truncate` vs full length then cut (botkit and transformers)."""
    sampling = {"temperature": 1.0, "top_k": 40}
    seconds = {"botkit_early_stop": 0.0, "botkit_full_then_cut": 0.0, "hf_full_then_cut": 0.0}
    num_useful, num_mismatches, ends = 0, 0, []
    for i, (prompt, k) in enumerate(zip(prompts, positions, strict=False)):
        common = {"prefix": prompt, "length": length, "seed": seed + i, "include_prefix": False, "return_as_list": True}
        # the full-length botkit arm doubles as the reference run that places the truncate string
        (full,), dt = timed(lambda common=common: botkit.generate(lm, **common, **sampling))
        seconds["botkit_full_then_cut"] += dt
        picked = pick_truncate(lm, full, k)
        if picked is None:
            log(f"  prompt {i}: no unique token near position {k}; skipped")
            seconds["botkit_full_then_cut"] -= dt
            continue
        truncate, expected = picked

        def run_early(common=common, truncate=truncate):
            return botkit.generate(lm, **common, truncate=truncate, **sampling)[0]

        def run_hf(prompt=prompt, seed=seed + i):
            torch.manual_seed(seed)
            return hf_generate(lm, prompt, 1, length, do_sample=True, **sampling)

        order = [("botkit_early_stop", run_early), ("hf_full_then_cut", run_hf)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            result, dt = timed(fn)
            seconds[name] += dt
            if name == "botkit_early_stop":
                num_mismatches += result != expected.lstrip("\n")
        useful = len(lm.tokenizer(expected).input_ids)
        num_useful += useful
        ends.append(useful)
        log(f"  prompt {i}: truncate {truncate!r} after {useful} of {length} tokens")
    result = {name: num_useful / s for name, s in seconds.items()}
    speedup = result["botkit_early_stop"] / result["hf_full_then_cut"]
    same_engine = result["botkit_early_stop"] / result["botkit_full_then_cut"]
    log(
        f"early stop: useful tok/s {', '.join(f'{n} {v:.1f}' for n, v in result.items())}; "
        f"speedup vs transformers {speedup:.2f}, vs botkit full length {same_engine:.2f}, {num_mismatches} text "
        "mismatches"
    )
    return {
        "useful_tok_s": result,
        "speedup": speedup,
        "speedup_same_engine": same_engine,
        "useful_tokens": ends,
        "length": length,
        "num_text_mismatches": num_mismatches,
    }


def long_generation(prompt: str, length: int, seed: int) -> dict:
    """Seconds for 2 samples of `length` tokens with this botkit and with botkit at BEFORE, each in a
    subprocess of its own (the same interpreter, threads and seeded model)."""
    root = Path(__file__).resolve().parents[1]
    seconds = {}
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", BEFORE, "botkit"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        for name, path in (("now", str(root)), ("before", old)):
            env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(
                [sys.executable, "-c", LONG, prompt, str(seed), str(length)],
                capture_output=True,
                text=True,
                env=env,
                cwd=path,
                check=True,
            )
            seconds[name] = float(out.stdout.split()[0])
            log(f"long generation, {name}: 2 x {length} tokens in {seconds[name]:.1f} s")
    return {"seconds": seconds, "speedup": seconds["before"] / seconds["now"], "length": length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens (about 2 minutes)")
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="JSONL with a 'prompt' per line")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long", action="store_true", help="also the long-generation case with --quick")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    lm = load_model(GPT2Config(), device="cpu", dtype="float32", seed=args.seed)
    if args.quick:
        num_b1, num_b8, length, early_positions, early_length = 4, 2, 24, [4, 12, 24, 40], 64
    else:
        num_b1, num_b8, length, early_positions, early_length = 8, 4, 64, [4, 10, 16, 24, 32, 44, 56, 80], 160
    prompts = load_prompts(args.workload, lm, max(num_b1, len(early_positions)), [8, 16, 32, 48])
    log(f"GPT-2 124M shapes, random weights, {torch.get_num_threads()} torch threads; warming up")
    botkit.generate(lm, prefix=prompts[0], length=4, temperature=0, return_as_list=True)
    hf_generate(lm, prompts[0], 1, 4, do_sample=False)

    b1 = same_work(lm, prompts[:num_b1], 1, length)
    b8 = same_work(lm, prompts[:num_b8], 8, length)
    stop = early_stop(lm, prompts, early_positions, early_length, args.seed)
    long = long_generation(prompts[1], 1500, args.seed) if args.long or not args.quick else None
    print(
        json.dumps(
            {
                "ratio_vs_hf": round(min(b1["ratio"], b8["ratio"]), 3),
                "ratio_vs_hf_b1": round(b1["ratio"], 3),
                "ratio_vs_hf_b8": round(b8["ratio"], 3),
                "early_stop_speedup": round(stop["speedup"], 3),
                "early_stop_speedup_same_engine": round(stop["speedup_same_engine"], 3),
                "tok_s": {
                    "botkit_b1": round(b1["botkit_tok_s"], 2),
                    "hf_b1": round(b1["hf_tok_s"], 2),
                    "botkit_b8": round(b8["botkit_tok_s"], 2),
                    "hf_b8": round(b8["hf_tok_s"], 2),
                },
                "useful_tok_s": {name: round(v, 2) for name, v in stop["useful_tok_s"].items()},
                "early_stop_useful_tokens": stop["useful_tokens"],
                "early_stop_length": stop["length"],
                "text_mismatches": {
                    "b1": b1["num_text_mismatches"],
                    "b8": b8["num_text_mismatches"],
                    "early_stop": stop["num_text_mismatches"],
                },
                "new_tokens": length,
                "threads": torch.get_num_threads(),
                "quick": args.quick,
            }
            | (
                {
                    "long_speedup": round(long["speedup"], 2),
                    "long_seconds": {k: round(v, 1) for k, v in long["seconds"].items()},
                    "long_length": long["length"],
                }
                if long
                else {}
            )
        )
    )


if __name__ == "__main__":
    main()
