"""Decode attention on this device: one SDPA call per row (botkit's CPU path) vs one padded call for
all rows (its GPU path), for one GPT-2 124M layer (12 heads of 64) and rows of chat-like lengths.
Then candidates (`candidates = 4`): the rows in groups of 4 that hold the same prompt (of the same
chat-like lengths) and 1-32 tokens of their own, one call per row vs the group reading its prompt
once (kvcache._decode_sharing_prompts).

Both arms read the same cache buffer and alternate within this process; the figure is the median of
`--repeat` timings each. Also checks that the two agree (to rounding: a padded call reduces over the
padded length, so the last bit may differ). Last stdout line: one JSON object.

    python benchmarks/attention.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from botkit.kvcache import Step, rows_attention


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rows: int, repeat: int, device: str, heads: int = 12, dim: int = 64, capacity: int = 1024) -> dict:
    lengths = torch.randint(70, 1000, (rows,)).tolist()  # the chat workload's contexts grow from ~70 to the window
    key = torch.randn(rows, heads, capacity, dim, device=device)
    value = torch.randn_like(key)
    query = torch.randn(1, heads, rows, dim, device=device)
    where = torch.zeros(1, dtype=torch.long)
    per_row = Step([(r, n) for r, n in enumerate(lengths)], [], where, padded=False)
    padded = Step(per_row.decode, [], where, padded=True)

    def run(step: Step) -> torch.Tensor:
        return rows_attention(None, query, key, value, None, step=step, scaling=dim**-0.5)[0]

    diff = float((run(per_row) - run(padded)).abs().max())
    timed(lambda: run(per_row), 3), timed(lambda: run(padded), 3)  # warm up
    t_rows, t_padded = timed(lambda: run(per_row), repeat), timed(lambda: run(padded), repeat)
    return {"per_row_ms": round(t_rows * 1e3, 3), "padded_ms": round(t_padded * 1e3, 3),
            "padded_vs_per_row": round(t_rows / t_padded, 2), "max_abs_diff": diff}


def measure_candidates(rows: int, repeat: int, device: str, heads: int = 12, dim: int = 64, capacity: int = 1024) -> dict:
    prompts = torch.randint(70, 960, (rows // 4,)).tolist()
    own = torch.randint(1, 33, (rows,)).tolist()
    key = torch.randn(rows, heads, capacity, dim, device=device)
    value = torch.randn_like(key)
    for g, p in enumerate(prompts):  # each group's rows hold its first row's prompt
        key[4 * g + 1 : 4 * g + 4, :, :p] = key[4 * g, :, :p]
        value[4 * g + 1 : 4 * g + 4, :, :p] = value[4 * g, :, :p]
    query = torch.randn(1, heads, rows, dim, device=device)
    where = torch.zeros(1, dtype=torch.long)
    decode = [(r, prompts[r // 4] + own[r]) for r in range(rows)]
    per_row = Step(decode, [], where)
    shared = Step(decode, [], where, shared=[(list(range(4 * g, 4 * g + 4)), p) for g, p in enumerate(prompts)])

    def run(step: Step) -> torch.Tensor:
        return rows_attention(None, query, key, value, None, step=step, scaling=dim**-0.5)[0]

    diff = float((run(per_row) - run(shared)).abs().max())
    timed(lambda: run(per_row), 3), timed(lambda: run(shared), 3)
    t_rows, t_shared = timed(lambda: run(per_row), repeat), timed(lambda: run(shared), repeat)
    return {"per_row_ms": round(t_rows * 1e3, 3), "shared_prompt_ms": round(t_shared * 1e3, 3),
            "shared_vs_per_row": round(t_rows / t_shared, 2), "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    with torch.inference_mode():
        for rows in args.rows:
            results[rows] = r = measure(rows, args.repeat, args.device)
            print(f"{rows} rows: per row {r['per_row_ms']:.2f} ms, padded {r['padded_ms']:.2f} ms, max |diff| {r['max_abs_diff']:.1e}",
                  flush=True)
        candidates = {}
        for rows in args.rows:
            candidates[rows] = r = measure_candidates(rows, args.repeat, args.device)
            print(f"{rows} rows as candidates of {rows // 4} prompts: per row {r['per_row_ms']:.2f} ms, "
                  f"prompt read once {r['shared_prompt_ms']:.2f} ms, max |diff| {r['max_abs_diff']:.1e}", flush=True)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "layer": "12 heads x 64", "rows": results,
                      "candidates_of_4": candidates}))


if __name__ == "__main__":
    main()
