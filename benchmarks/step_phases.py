"""Where an engine step's time goes, per phase, and the speed candidates weighed against it.

GPT-2 124M shapes (`GPT2Config()`), random weights, fp32 on CPU, greedy. Prompts are the shared
workload's first requests (`../shared/bench/workload.jsonl`). Two kinds of step are measured:

- decode: R rows each taking one token (R = --rows, e.g. 1, 16, 64), after their prompts are in;
- join: one step that takes in prompts only (about MAX_JOIN_TOKENS tokens).

Phases of a step (ms per step): schedule (Scheduler.schedule), the forward split into matmuls (the
four Conv1D projections of every block), attention (rows_attention), LM head, and the rest of the
forward (embeddings, layer norms, GELU, residual adds, the cache writes); sample (Engine._sample);
post-process (detokenise, stops). Timers are forward hooks and wrappers around those calls (CPU:
every op has finished when its call returns).

Arms are engine settings measured in this one process, interleaved (arm A, arm B, A, B, ...) and
repeated, because other work shares this machine's cores: compare their ratios, not their
absolute times. Each arm's greedy tokens are compared with the first arm's.

Progress goes to stderr; the last stdout line is one JSON object.

    python benchmarks/step_phases.py --rows 1 16 64 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AttentionInterface, GPT2Config

from botkit.engine import kvcache
from botkit.engine.engine import Engine
from botkit.model.loading import load_model
from botkit.model.prepack import prepack
from botkit.params import SamplingParams

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workload.jsonl"
PHASES = ("schedule", "matmuls", "attention", "lm_head", "forward_rest", "sample", "postprocess", "other")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Phases:
    """Accumulates seconds per phase while `on` is set."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[name] += time.perf_counter() - start

        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        started = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(name, time.perf_counter() - started.pop()))

    def _add(self, name: str, seconds: float) -> None:
        if self.on:
            self.seconds[name] += seconds


def instrument(engine: Engine, phases: Phases) -> None:
    """Timers around each phase of `engine`'s step (instance attributes: only this engine is timed)."""
    engine.scheduler.schedule = phases.wrap("schedule", engine.scheduler.schedule)
    engine.runner.run = phases.wrap("forward", engine.runner.run)
    engine._sample = phases.wrap("sample", engine._sample)
    engine.post.process = phases.wrap("postprocess", engine.post.process)
    # after the engine's own
    AttentionInterface.register(kvcache.ROWS_ATTENTION, phases.wrap("attention", kvcache.rows_attention))
    model = engine.runner.model
    if getattr(model, "_phase_hooks", False):  # hooks stay on a model: once per model, not per engine
        return
    model._phase_hooks = True
    for block in model.transformer.h:
        for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            phases.hook(module, "matmuls")
    phases.hook(model.lm_head, "lm_head")


def prompts(lm, path: Path, n: int) -> list[list[int]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [lm.tokenizer(r["prompt"]).input_ids for r in lines[:n]]


def measure(lm, arm: dict, ids: list[list[int]], rows: int, num_steps: int, phases: Phases) -> dict:
    """One arm: a join step of `rows` prompts (in steps of up to MAX_JOIN_TOKENS), then `num_steps` decode steps."""
    lm = arm.get("lm", lm)
    engine = Engine(lm, rows, cache_mb=0, padded_decode=arm.get("padded_decode", False))
    instrument(engine, phases)
    params = SamplingParams(max_new_tokens=num_steps + 2, temperature=0)
    seqs = [engine.add(p, params) for p in ids[:rows]]
    out = {}
    for kind, steps in (("join", None), ("decode", num_steps)):
        phases.seconds.clear()
        phases.on = True
        start, num = time.perf_counter(), 0
        while engine.waiting if kind == "join" else num < steps:
            engine.step()
            num += 1
        total = time.perf_counter() - start
        phases.on = False
        s = dict(phases.seconds)
        forward = s.pop("forward", 0.0)
        s["forward_rest"] = forward - s.get("matmuls", 0) - s.get("attention", 0) - s.get("lm_head", 0)
        s["other"] = total - forward - s.get("schedule", 0) - s.get("sample", 0) - s.get("postprocess", 0)
        out[kind] = {"steps": num, "ms_per_step": total / num * 1e3, **{p: s.get(p, 0.0) / num * 1e3 for p in PHASES}}
    out["tokens"] = [s.generated for s in seqs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=12, help="decode steps per measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["per_row", "padded_decode", "prepack"], choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(GPT2Config(), device="cpu", dtype="float32", seed=0)
    ids = prompts(lm, args.workload, max(args.rows))
    if "prepack" in args.arms:
        ARMS["prepack"]["lm"] = dataclasses.replace(lm, model=prepack(lm.model))
    if "prepack_head" in args.arms:
        ARMS["prepack_head"]["lm"] = dataclasses.replace(lm, model=prepack(lm.model, blocks=False))
    phases = Phases()
    results: dict = {}
    for rows in args.rows:
        runs: dict[str, list[dict]] = defaultdict(list)
        for rep in range(args.repeat):
            for arm in args.arms:
                runs[arm].append(measure(lm, ARMS[arm], ids, rows, args.steps, phases))
                log(f"rows {rows} rep {rep} {arm}: decode {runs[arm][-1]['decode']['ms_per_step']:.1f} ms/step")
        level = {}
        for arm, got in runs.items():
            level[arm] = {
                kind: {k: round(statistics.median(r[kind][k] for r in got), 2) for k in got[0][kind]}
                for kind in ("join", "decode")
            }
            level[arm]["same_tokens_as_first_arm"] = all(r["tokens"] == runs[args.arms[0]][0]["tokens"] for r in got)
        base = level[args.arms[0]]
        for arm in args.arms[1:]:
            level[arm]["decode_speedup"] = round(base["decode"]["ms_per_step"] / level[arm]["decode"]["ms_per_step"], 3)
            level[arm]["join_speedup"] = round(base["join"]["ms_per_step"] / level[arm]["join"]["ms_per_step"], 3)
        results[str(rows)] = level
    print(
        json.dumps(
            {
                "cpu": platform.processor() or platform.machine(),
                "threads": args.threads,
                "torch": torch.__version__,
                "steps": args.steps,
                "repeat": args.repeat,
                "levels": results,
            }
        )
    )


ARMS = {  # engine settings to weigh; the first is the baseline
    "per_row": {},
    "padded_decode": {"padded_decode": True},
    # the model's matmul weights in oneDNN's layout (botkit/model/prepack.py); its model is built in main()
    "prepack": {},
    "prepack_head": {},  # the LM head only
}

if __name__ == "__main__":
    main()
