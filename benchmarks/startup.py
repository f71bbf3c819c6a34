"""First contact: how long `botkit --help`, `import botkit` and an offline hub name take, against
what `--help` cost when importing botkit loaded torch, transformers, accelerate and matplotlib
(the same imports, timed in the same run). Median of `--repeat` runs each; last line one JSON object.

    python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(args: list[str], env: dict | None = None, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(args, capture_output=True, env={**os.environ, **(env or {})}, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    py = sys.executable
    with tempfile.TemporaryDirectory() as hf_home:
        offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": hf_home}
        figures = {
            "help_s": timed([py, "-m", "botkit", "--help"], repeat=repeat),
            "import_botkit_s": timed([py, "-c", "import botkit"], repeat=repeat),
            "heavy_imports_s": timed(
                [py, "-c", "import botkit.model.loading, botkit.train.trainer, botkit.engine.engine"], repeat=repeat
            ),
            "offline_hub_name_s": timed(
                [py, "-m", "botkit", "generate", "--model", "gpt2"], env=offline, repeat=repeat
            ),
        }
    figures["help_speedup"] = round(figures["heavy_imports_s"] / figures["help_s"], 1)
    for key, value in figures.items():
        print(f"{key:>20}: {value:.2f}")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
