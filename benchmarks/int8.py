"""int8 vs float32 on CPU (`dtype = "int8"`, botkit/model/quantize.py): speed per layer and per engine step,
throughput on the shared workload, memory, and the quality cost on real text.

Speed: GPT-2 124M shapes (`GPT2Config()`), random weights (the time depends only on the shapes), one
float32 model and an int8 copy of it, in this process, arms alternating (the order swaps every round).
A ratio is float32 time / int8 time (> 1: int8 is faster): the median over rounds, with the 25th-75th
percentile of the rounds' ratios as the noise figure.

1. `layers`: each matmul of a block (attention c_attn 768->2304 and c_proj 768->768, MLP c_fc 768->3072
   and c_proj 3072->768) and the LM head (768->50,257), transformers' own float32 modules vs
   `Int8Linear`, at 1, 8 and 64 rows (a decode step of that many chats) and 1,000 rows (a prefill; not
   for the head, which the engine only runs on each row's last token).
2. `steps`: whole engine steps (`Engine.step`: the forward pass with botkit's attention and KV cache,
   sampling, text): decode steps with 1, 8 and 64 rows (prompts of 64 tokens, then 64 rows decode
   together), and the prefill step of one 1,000-token prompt.
3. `workload`: the first requests of the shared workload (`prompt`, `max_new_tokens`, `stop`; greedy)
   through the engine with 64 rows, all queued at once; useful tokens/s, float32 and int8 run
   alternately (ABBA). CTranslate2 int8 measured 1.6x botkit float32 on this workload's 64-chat level.
4. `quality`: the bundled demo model (botkit/assets/demo, a 4-layer GPT-2 trained on Debian fortunes)
   on the corpus's held-out last 5 % (65 blocks of 256 tokens, as its MODEL_CARD): loss in nats/token,
   float32 vs int8. The corpus comes from scripts/fortunes_corpus.py (apt-get download, once).
5. `memory`: bytes of parameters and buffers (shared tensors once), GPT-2 124M.

Progress goes to stderr; the last stdout line is one JSON object with the figures.

    python benchmarks/int8.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import runpy
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GPT2Config

from botkit.engine.engine import Engine
from botkit.model.loading import LoadedModel, load_model
from botkit.model.quantize import Int8Linear, has_fast_int8, model_bytes, quantize_int8
from botkit.params import SamplingParams
from botkit.train.encoding import load_tokens
from botkit.train.trainer import evaluate_loss

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOAD = ROOT.parent / "shared" / "bench" / "workload.jsonl"
PARTS = ("quality", "memory", "layers", "steps", "workload")
DEFAULT_CORPUS_DIR = Path("/tmp/botkit-demo")  # what scripts/fortunes_corpus.py and train_demo.sh use


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def summary(ratios: list[float]) -> dict:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": round(q[1], 2), "p25": round(q[0], 2), "p75": round(q[2], 2), "rounds": len(ratios)}


def paired(fp32, int8, rounds: int, reps: int = 1) -> tuple[list[float], float, float]:
    """Per-round ratios fp32/int8 of `reps` calls each, alternating which arm goes first; and each
    arm's median seconds per call."""
    fp32(), int8()  # warm up: oneDNN builds its kernels on first use
    ratios, times = [], {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        took = {}
        for arm in order:
            fn = (fp32, int8)[arm]
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            took[arm] = (time.perf_counter() - start) / reps
            times[arm].append(took[arm])
        ratios.append(took[0] / took[1])
    return ratios, statistics.median(times[0]), statistics.median(times[1])


@torch.inference_mode()
def bench_layers(model, fast: bool, rounds: int) -> dict:
    block = model.transformer.h[0]
    layers = {
        "attn.c_attn": block.attn.c_attn,
        "attn.c_proj": block.attn.c_proj,
        "mlp.c_fc": block.mlp.c_fc,
        "mlp.c_proj": block.mlp.c_proj,
        "lm_head": model.lm_head,
    }
    out = {}
    for name, layer in layers.items():
        q = Int8Linear.of(layer, fast)
        for rows in (1, 8, 64, 1000):
            if name == "lm_head" and rows > 64:
                continue
            x = torch.randn(1, rows, q.in_features)  # (batch 1, tokens, in): the engine's flat step
            est = max(1e-5, 2 * rows * q.in_features * q.out_features / 100e9)  # ~seconds at 100 GFLOP/s
            ratios, t_fp32, t_int8 = paired(partial(layer, x), partial(q, x), rounds, reps=max(1, int(0.01 / est)))
            out[f"{name} x{rows}"] = {
                **summary(ratios),
                "fp32_ms": round(t_fp32 * 1e3, 3),
                "int8_ms": round(t_int8 * 1e3, 3),
            }
            log(
                f"layer {name:12s} rows {rows:5d}: fp32 {t_fp32 * 1e3:8.3f} ms, int8 {t_int8 * 1e3:8.3f} ms, "
                f"ratio {out[f'{name} x{rows}']['ratio']}"
            )
    return out


def decode_engines(lms: list[LoadedModel], rows: int, prompt_len: int, max_new: int) -> list[Engine]:
    """One engine per model with `rows` rows joined and decoding (the same random prompts in each)."""
    g = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(0, 50000, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    engines = []
    for lm in lms:
        engine = Engine(lm, max_batch_size=rows, cache_mb=0)
        for ids in prompts:
            engine.add(ids, SamplingParams(max_new_tokens=max_new, temperature=0))
        while engine.waiting:
            engine.step()
        engines.append(engine)
    return engines


def bench_steps(fp32: LoadedModel, int8: LoadedModel, rounds: int) -> dict:
    out = {}
    for rows in (1, 8, 64):
        engines = decode_engines([fp32, int8], rows, prompt_len=64, max_new=rounds + 8)
        ratios, t_fp32, t_int8 = paired(engines[0].step, engines[1].step, rounds)
        assert all(len(e.rows) == rows for e in engines), "a row ended early: the step sizes would differ"
        out[f"decode x{rows}"] = {
            **summary(ratios),
            "fp32_ms": round(t_fp32 * 1e3, 1),
            "int8_ms": round(t_int8 * 1e3, 1),
        }
        log(
            f"step decode x{rows}: fp32 {t_fp32 * 1e3:.1f} ms, int8 {t_int8 * 1e3:.1f} ms, ratio "
            f"{out[f'decode x{rows}']['ratio']}"
        )
    prompt = torch.randint(0, 50000, (1000,), generator=torch.Generator().manual_seed(0)).tolist()

    def timed_prefill(lm: LoadedModel) -> float:
        engine = Engine(lm, max_batch_size=1, cache_mb=0)  # a fresh engine: nothing reused
        engine.add(prompt, SamplingParams(max_new_tokens=2, temperature=0))
        start = time.perf_counter()
        engine.step()  # the 1,000 prompt tokens in one forward pass, and the first new token
        return time.perf_counter() - start

    timed_prefill(fp32), timed_prefill(int8)  # warm up
    ratios, t = [], {0: [], 1: []}
    for r in range(max(3, rounds // 2)):
        for arm in (0, 1) if r % 2 == 0 else (1, 0):
            t[arm].append(timed_prefill((fp32, int8)[arm]))
        ratios.append(t[0][-1] / t[1][-1])
    out["prefill 1000"] = {
        **summary(ratios),
        "fp32_ms": round(statistics.median(t[0]) * 1e3, 1),
        "int8_ms": round(statistics.median(t[1]) * 1e3, 1),
    }
    log(f"step prefill 1000: ratio {out['prefill 1000']['ratio']}")
    return out


def bench_workload(fp32: LoadedModel, int8: LoadedModel, path: Path, num_requests: int, max_batch: int) -> dict:
    requests = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][
        :num_requests
    ]
    jobs = [
        (
            fp32.tokenizer(r["prompt"]).input_ids,
            SamplingParams(
                max_new_tokens=r["max_new_tokens"], temperature=0, stop=(r["stop"],) if r.get("stop") else ()
            ),
        )
        for r in requests
    ]

    def run(lm: LoadedModel) -> tuple[int, float]:
        engine = Engine(lm, max_batch_size=max_batch, cache_mb=0)
        seqs = [engine.add(ids, params) for ids, params in jobs]
        start = time.perf_counter()
        while engine.has_work:
            engine.step()
        return sum(len(s.generated) for s in seqs), time.perf_counter() - start

    rates = {"fp32": [], "int8": []}
    for arm in ("fp32", "int8", "int8", "fp32"):  # ABBA: a drift in the machine's load hits both arms alike
        tokens, took = run(fp32 if arm == "fp32" else int8)
        rates[arm].append(tokens / took)
        log(f"workload {arm}: {tokens} tokens in {took:.1f} s, {tokens / took:.1f} tok/s")
    fp32_rate, int8_rate = statistics.mean(rates["fp32"]), statistics.mean(rates["int8"])
    return {
        "requests": len(jobs),
        "max_batch": max_batch,
        "fp32_tok_s": round(fp32_rate, 1),
        "int8_tok_s": round(int8_rate, 1),
        "ratio": round(int8_rate / fp32_rate, 2),
        "runs_tok_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


@torch.inference_mode()
def bench_quality(corpus: Path) -> dict:
    fp32, int8 = load_model(None, device="cpu", dtype="float32"), load_model(None, device="cpu", dtype="int8")
    _, held_out = load_tokens(corpus, fp32.tokenizer).split(0.05)
    losses = {
        name: evaluate_loss(lm.model, held_out, 256, batch_size=8, max_batches=10**6)
        for name, lm in (("fp32", fp32), ("int8", int8))
    }
    delta = losses["int8"] / losses["fp32"] - 1
    log(f"quality: held-out loss fp32 {losses['fp32']:.4f}, int8 {losses['int8']:.4f} nats/token ({delta:+.3%})")
    return {
        "model": "botkit/assets/demo",
        "held_out_tokens": len(held_out) // 256 * 256,
        "fp32_loss": round(losses["fp32"], 4),
        "int8_loss": round(losses["int8"], 4),
        "relative_delta": round(delta, 5),
    }


def corpus_path(given: Path | None) -> Path:
    if given:
        return given
    path = DEFAULT_CORPUS_DIR / "fortunes.txt"
    if not path.is_file():
        log(f"building the demo model's corpus in {DEFAULT_CORPUS_DIR} (scripts/fortunes_corpus.py)")
        runpy.run_path(str(ROOT / "scripts" / "fortunes_corpus.py"))["main"](DEFAULT_CORPUS_DIR)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (about 5 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="the shared bench/workload.jsonl")
    parser.add_argument("--requests", type=int, default=None, help="workload requests (default 128, quick 64)")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="fortunes.txt from scripts/fortunes_corpus.py "
        f"(default: {DEFAULT_CORPUS_DIR}/fortunes.txt, built if missing)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which measurements, comma-separated (default: all of {','.join(PARTS)})",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 8 if args.quick else 20
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fast_int8_kernel": has_fast_int8(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    log(
        f"torch {torch.__version__}, {report['threads']} threads, fast int8 kernel (AVX-512 VNNI): "
        f"{report['fast_int8_kernel']}"
    )

    if "quality" in parts:
        report["quality"] = bench_quality(corpus_path(args.corpus))
    fp32 = load_model(GPT2Config(), device="cpu", dtype="float32", seed=0)
    int8 = LoadedModel(quantize_int8(copy.deepcopy(fp32.model)), fp32.tokenizer, name="random-gpt2-int8")
    if "memory" in parts:
        report["memory"] = {
            "fp32_mb": round(model_bytes(fp32.model) / 2**20, 1),
            "int8_mb": round(model_bytes(int8.model) / 2**20, 1),
        }
        log(f"memory: {report['memory']}")
    if "layers" in parts:
        report["layers"] = bench_layers(fp32.model, report["fast_int8_kernel"], rounds)
    if "steps" in parts:
        report["steps"] = bench_steps(fp32, int8, rounds)
    if "workload" in parts:
        report["workload"] = bench_workload(
            fp32, int8, args.workload, args.requests or (64 if args.quick else 128), max_batch=64
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
