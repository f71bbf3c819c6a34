"""Serving throughput: many chats through botkit's Core vs sequential `model.generate`.

GPT-2 124M shapes (`GPT2Config()`), random weights, fp32 on CPU. Requests come from the shared
workload (`prompt` text, `max_new_tokens`, `stop`), greedy. Each concurrency level runs the real
Core (LocalBackend worker thread, SQLite store in a temp dir, fair queue) as a closed loop: C chats,
each sends its next request as soon as its previous one is answered, taking requests from the
workload in order. Throughput is useful tokens (each reply's generated tokens, end of text excluded)
over the level's wall time, drain at the end included.

The baseline is what a simple bot does: one `model.generate` per request, greedy, the same
`max_new_tokens`, stopping at the request's stop string, one after another. It is measured on the
first requests of the workload in two halves, before and after the 64-chat run, so the ratio at
64 chats compares arms run side by side on a shared, noisy machine. Greedy replies of the two arms
are compared text for text.

`full_steps_ratio` is the ceiling this engine sets on this machine: the 64-chat level's tokens/s if
every step were full (its prompt tokens at the speed of a step that only takes in prompts, its
reply tokens at the speed of decode steps with all 64 rows), over the same baseline.

Event-loop lag: a task sleeps 10 ms in a loop and records how late it wakes, during each level.

Optional anchor arms, run on the 64-chat level's requests right after it: CTranslate2 fp32 and int8
when `ctranslate2` is installed (`pip install ctranslate2`, never a botkit dependency; how it is
served: benchmarks/ct2_arm.py), with their greedy texts compared to botkit's, and botkit with int8
weights when this botkit has `dtype = "int8"`.

Progress goes to stderr; the last stdout line is one JSON object with the figures.

    python benchmarks/serve.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import torch
from transformers import GPT2Config, StoppingCriteria, StoppingCriteriaList

from botkit.config import Config
from botkit.engine.engine import Engine
from botkit.errors import InputError
from botkit.model.loading import LoadedModel, load_model
from botkit.params import SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core, Who
from botkit.serve.store import Store

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workload.jsonl"
LEVELS = (1, 8, 32, 64)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def load_requests(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def params_of(request: dict) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=request["max_new_tokens"], temperature=0, stop=(request["stop"],) if request["stop"] else ()
    )


def cut_at_stop(text: str, stop: str | None) -> tuple[str, bool]:
    if stop and stop in text:
        return text[: text.index(stop)], True
    return text, False


class StopOnText(StoppingCriteria):
    """Stops a batch-1 generate once the new text contains the stop string (decoding the new tokens)."""

    def __init__(self, lm: LoadedModel, stop: str, prompt_len: int):
        self.lm, self.stop, self.prompt_len = lm, stop, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        text = self.lm.tokenizer.decode(input_ids[0, self.prompt_len :])
        return torch.tensor([self.stop in text], device=input_ids.device)


def sequential(lm: LoadedModel, requests: list[dict]) -> tuple[int, float, dict[int, str]]:
    """One greedy `model.generate` per request; returns (useful tokens, seconds, texts by request id)."""
    num_tokens, texts = 0, {}
    start = time.perf_counter()
    for request in requests:
        enc = lm.tokenizer(request["prompt"], return_tensors="pt")
        prompt_len = enc.input_ids.shape[1]
        criteria = StoppingCriteriaList([StopOnText(lm, request["stop"], prompt_len)] if request["stop"] else [])
        out = lm.model.generate(
            **enc,
            max_new_tokens=request["max_new_tokens"],
            do_sample=False,
            pad_token_id=lm.eos_token_id,
            stopping_criteria=criteria,
        )
        new = out[0, prompt_len:].tolist()
        if lm.eos_token_id in new:
            new = new[: new.index(lm.eos_token_id)]
        num_tokens += len(new)
        texts[request["id"]], _ = cut_at_stop(lm.tokenizer.decode(new), request["stop"])
    return num_tokens, time.perf_counter() - start, texts


def full_batch_speeds(lm: LoadedModel, requests: list[dict], max_batch: int) -> tuple[float, float]:
    """The engine's own speeds when its steps are full: prompt tokens/s of a step that takes in
    MAX_JOIN_TOKENS of prompts and nothing else, and tokens/s of decode steps with `max_batch` rows."""
    params = SamplingParams(max_new_tokens=512, temperature=0)
    engine = Engine(lm, max_batch)
    for request in requests[:max_batch]:
        engine.add(lm.tokenizer(request["prompt"]).input_ids, params)
    start = time.perf_counter()
    engine.step()  # nothing is running yet: the step is all prompt tokens
    join_tok_s = sum(len(seq.prompt_ids) for seq in engine.rows) / (time.perf_counter() - start)
    while engine.waiting:
        engine.step()
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    return join_tok_s, 10 * len(engine.rows) / (time.perf_counter() - start)


async def watch_loop(lags_ms: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.010)
        lags_ms.append((time.perf_counter() - start - 0.010) * 1000)


async def serve(
    lm: LoadedModel, requests: list[dict], num_chats: int, max_batch: int, config: Config, folder: Path
) -> dict:
    """Closed loop of `num_chats` chats over `requests` through a fresh Core; returns the level's figures."""
    todo = deque(requests)
    latencies_ms, lags_ms, texts = [], [], {}
    num_tokens = 0

    async def chat(core: Core, index: int) -> None:
        nonlocal num_tokens
        while todo:
            request = todo.popleft()
            start = time.perf_counter()
            ticket = await core.submit(
                request["prompt"],
                params_of(request),
                who=Who(platform="bench", chat_id=f"c{index}", user_id=f"u{index}"),
            )
            reply = await ticket.result()
            latencies_ms.append((time.perf_counter() - start) * 1000)
            num_tokens += reply.num_tokens
            texts[request["id"]] = reply.text

    async with (
        Store.open(folder / f"serve-{num_chats}.db") as store,
        LocalBackend(lm, max_batch_size=max_batch) as backend,
        Core(backend, store, config) as core,
    ):
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_loop(lags_ms, stop))
        start = time.perf_counter()
        await asyncio.gather(*(chat(core, i) for i in range(num_chats)))
        seconds = time.perf_counter() - start
        stop.set()
        await watcher
    return {
        "chats": num_chats,
        "requests": len(requests),
        "tokens": num_tokens,
        "seconds": round(seconds, 2),
        "tok_s": num_tokens / seconds,
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "loop_lag_p99_ms": percentile(lags_ms, 99),
        "loop_lag_max_ms": max(lags_ms, default=0.0),
        "texts": texts,
    }


def in_own_thread(fn, *args):
    """Run torch work in a thread that then exits. A live thread keeps its OpenMP team, and a second
    team (the core's worker) then runs slower (see botkit/serve/backends.py), which would handicap the core."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]


def load_int8() -> LoadedModel | None:
    """The benchmark's model with botkit's int8 weights, or None when this botkit has no int8 dtype."""
    try:
        return load_model(GPT2Config(), device="cpu", dtype="int8")
    except InputError:
        return None


def same_texts(a: dict, b: dict) -> str:
    shared = [i for i in a if i in b]
    return f"{sum(a[i] == b[i] for i in shared)}/{len(shared)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (about 3 minutes)")
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="the shared bench/workload.jsonl")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-batch", type=int, default=64, help="[batch] max_size of the Core")
    parser.add_argument("--rounds", type=int, default=None, help="requests per chat at each level (default 2, quick 1)")
    parser.add_argument(
        "--sequential", type=int, default=None, help="requests in the sequential baseline (default 32, quick 8)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rounds = args.rounds or (1 if args.quick else 2)
    num_sequential = args.sequential or (8 if args.quick else 32)
    requests = load_requests(args.workload)
    base = Config()
    config = dataclasses.replace(
        base,
        batch=dataclasses.replace(base.batch, max_size=args.max_batch, max_queue=4096, timeout_s=3600.0),
        limits=dataclasses.replace(base.limits, user_per_minute=0, chat_per_minute=0, max_message_chars=1_000_000),
    )

    lm = in_own_thread(lambda: load_model(GPT2Config(), device="cpu", dtype="float32"))
    lm_int8 = in_own_thread(load_int8)
    log(f"botkit int8: {'yes' if lm_int8 else 'no int8 dtype in this botkit, no botkit int8 arm'}")
    try:
        import ct2_arm  # optional anchor arms
    except ImportError:
        ct2_arm = None
        log("CTranslate2 is not installed: no CTranslate2 arms")
    log(f"GPT-2 124M shapes, random weights, {torch.get_num_threads()} torch threads; warming up")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generators = {}
        if ct2_arm:
            model_dir = in_own_thread(ct2_arm.convert, lm, folder)
            generators = {name: ct2_arm.load(model_dir, name) for name in ("float32", "int8")}
            log(
                f"CTranslate2 {ct2_arm.ctranslate2.__version__}: converted, same greedy tokens as transformers on the "
                "check prompts"
            )
            for generator in generators.values():
                ct2_arm.ctranslate2_serve(generator, lm, [dict(r, max_new_tokens=4) for r in requests[:4]], 4)
        in_own_thread(sequential, lm, [dict(requests[0], max_new_tokens=4)])
        asyncio.run(serve(lm, [dict(r, max_new_tokens=4) for r in requests[:4]], 4, args.max_batch, config, folder))
        if lm_int8:
            (folder / "int8").mkdir()  # its own stores
            asyncio.run(
                serve(
                    lm_int8,
                    [dict(r, max_new_tokens=4) for r in requests[:4]],
                    4,
                    args.max_batch,
                    config,
                    folder / "int8",
                )
            )

        half = num_sequential // 2
        seq_runs = []
        levels: dict[int, dict] = {}
        top_requests = requests[: max(2, 64 * rounds)]
        anchors: dict[str, dict] = {}  # the optional arms on the 64-chat level's requests
        order = [
            ("seq", requests[:half]),
            ("core", 64),
            *(("ct2", name) for name in generators),
            *([("core_int8", 64)] if lm_int8 else []),
            ("seq", requests[half:num_sequential]),
            *(("core", c) for c in LEVELS if c != 64),
        ]
        for kind, what in order:
            if kind == "ct2":
                anchors[what] = ct2_arm.ctranslate2_serve(generators[what], lm, top_requests, 64)
                log(
                    f"CTranslate2 {what}: {len(top_requests)} requests, {anchors[what]['tokens']} tokens in "
                    f"{anchors[what]['seconds']:.1f}s = {anchors[what]['tok_s']:.1f} tok/s"
                )
            elif kind == "core_int8":
                anchors["botkit_int8"] = asyncio.run(
                    serve(lm_int8, top_requests, 64, args.max_batch, config, folder / "int8")
                )
                log(
                    f"botkit int8, 64 chats: {anchors['botkit_int8']['tokens']} tokens in "
                    f"{anchors['botkit_int8']['seconds']}s = "
                    f"{anchors['botkit_int8']['tok_s']:.1f} tok/s"
                )
            elif kind == "seq":
                tokens, seconds, texts = in_own_thread(sequential, lm, what)
                seq_runs.append((tokens, seconds, texts))
                log(
                    f"sequential: {len(what)} requests, {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} "
                    "tok/s"
                )
            else:
                chats = what
                level = asyncio.run(
                    serve(lm, requests[: max(2, chats * rounds)], chats, args.max_batch, config, folder)
                )
                levels[chats] = level
                log(
                    f"{chats} chats: {level['requests']} requests, {level['tokens']} tokens in {level['seconds']}s = "
                    f"{level['tok_s']:.1f} tok/s, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, "
                    f"loop lag p99 {level['loop_lag_p99_ms']:.1f} ms (max {level['loop_lag_max_ms']:.1f})"
                )

        generators.clear()  # ends CTranslate2's threads before the engine's own measurement
        join_tok_s, decode_tok_s = in_own_thread(full_batch_speeds, lm, requests, args.max_batch)
        log(
            f"engine with full steps: {join_tok_s:.0f} prompt tok/s (joining), {decode_tok_s:.0f} tok/s "
            f"({args.max_batch} rows decoding)"
        )

    seq_tokens = sum(t for t, _, _ in seq_runs)
    seq_tok_s = seq_tokens / sum(s for _, s, _ in seq_runs)
    seq_texts = {k: v for _, _, texts in seq_runs for k, v in texts.items()}
    top_texts = dict(levels[64]["texts"])
    core_texts = {}
    for level in levels.values():
        core_texts.update(level.pop("texts"))
    compared = [i for i in seq_texts if i in core_texts]
    mismatches = sum(seq_texts[i] != core_texts[i] for i in compared)
    log(
        f"greedy texts: {len(compared) - mismatches} of {len(compared)} replies equal between the core and sequential "
        "generate"
    )
    top = levels[64]
    extra = {}
    if "float32" in anchors:
        fp32, int8 = anchors["float32"], anchors["int8"]
        extra = {
            "ctranslate2_fp32_tok_s": round(fp32["tok_s"], 1),
            "ctranslate2_int8_tok_s": round(int8["tok_s"], 1),
            "ratio_vs_ctranslate2_fp32": round(top["tok_s"] / fp32["tok_s"], 2),
            "ratio_vs_ctranslate2_int8": round(top["tok_s"] / int8["tok_s"], 2),
            "ctranslate2_fp32_same_text": same_texts(fp32["texts"], top_texts),
        }
        log(f"greedy texts: {extra['ctranslate2_fp32_same_text']} replies equal between botkit and CTranslate2 fp32")
    if "botkit_int8" in anchors:
        extra |= {
            "botkit_int8_tok_s": round(anchors["botkit_int8"]["tok_s"], 1),
            "ratio_int8_vs_fp32": round(anchors["botkit_int8"]["tok_s"] / top["tok_s"], 2),
        }
        if "int8" in anchors:
            extra |= {
                "ratio_int8_vs_ctranslate2_int8": round(anchors["botkit_int8"]["tok_s"] / anchors["int8"]["tok_s"], 2),
                "int8_same_text": same_texts(anchors["int8"]["texts"], anchors["botkit_int8"]["texts"]),
            }
    # Tokens/s of the 64-chat level if every step were full: its prompt tokens at the joining speed,
    # its reply tokens at the full-batch decode speed (no ramp-up, no drain).
    prompt_tokens = sum(len(lm.tokenizer(r["prompt"]).input_ids) for r in requests[: top["requests"]])
    full_tok_s = top["tokens"] / (prompt_tokens / join_tok_s + top["tokens"] / decode_tok_s)
    print(
        json.dumps(
            {
                "ratio_vs_sequential": round(top["tok_s"] / seq_tok_s, 2),
                "p50_ms": round(top["p50_ms"]),
                "p99_ms": round(top["p99_ms"]),
                "loop_lag_p99_ms": round(max(level["loop_lag_p99_ms"] for level in levels.values()), 1),
                "sequential_tok_s": round(seq_tok_s, 2),
                "full_steps_ratio": round(full_tok_s / seq_tok_s, 2),
                "join_prompt_tok_s": round(join_tok_s),
                "full_decode_tok_s": round(decode_tok_s),
                "sequential_halves_tok_s": [round(t / s, 2) for t, s, _ in seq_runs],
                "levels": {
                    str(c): {k: (round(v, 2) if isinstance(v, float) else v) for k, v in levels[c].items()}
                    | {"ratio_vs_sequential": round(levels[c]["tok_s"] / seq_tok_s, 2)}
                    for c in LEVELS
                },
                "text_mismatches": mismatches,
                "texts_compared": len(compared),
                **extra,
                "threads": torch.get_num_threads(),
                "max_batch": args.max_batch,
                "quick": args.quick,
                "load": "closed loop: each chat sends its next request when the previous one is answered",
            }
        )
    )


if __name__ == "__main__":
    main()
