"""Decode attention on this device: one SDPA call per row (botkit's CPU path) vs one padded call for
all rows (its GPU path), for one GPT-2 124M layer (12 heads of 64) and rows of chat-like lengths.

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

from botkit.engine.kvcache import Step, rows_attention


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
    return {
        "per_row_ms": round(t_rows * 1e3, 3),
        "padded_ms": round(t_padded * 1e3, 3),
        "padded_vs_per_row": round(t_rows / t_padded, 2),
        "max_abs_diff": diff,
    }


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
            print(
                f"{rows} rows: per row {r['per_row_ms']:.2f} ms, padded {r['padded_ms']:.2f} ms, max |diff| "
                f"{r['max_abs_diff']:.1e}",
                flush=True,
            )
    print(
        json.dumps(
            {"device": args.device, "threads": torch.get_num_threads(), "layer": "12 heads x 64", "rows": results}
        )
    )


if __name__ == "__main__":
    main()
