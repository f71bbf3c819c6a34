"""Multi-turn chats: conversation KV reuse on vs off, through botkit's real Core.

GPT-2 124M shapes (`GPT2Config()`), random weights, fp32 on CPU, greedy. Turns come from the shared
chat workload (`../shared/bench/chat_workload.jsonl`: 64 chats x 8 turns); every chat runs as a
closed loop (it sends its next turn when its reply arrives), all chats at once, with `use_context`
on: each prompt carries the chat's earlier messages and replies, trimmed by the core to the window.

Arms, one after another in this process:
- reuse off (`[batch] cache_mb = 0`): every turn prefills its whole conversation;
- reuse on (the default `cache_mb`): a turn prefills only what its conversation added;
- sequential `model.generate` on a sample of the same full prompts (what a simple bot does);
- CTranslate2, when it is installed (`pip install ctranslate2`; never a botkit dependency): the
  same closed loop, each round one `generate_batch` over the prompts waiting (it has no continuous
  batching and no cache across calls).

Figures: follow-up time to first token (turns 1-7: submit to first streamed text) p50/p99, useful
tokens/s (generated tokens over the arm's wall time), the share of prompt tokens reused, peak memory.
Memory (`memory` in the JSON, per arm): the process's peak RSS (ru_maxrss: run one arm per process,
`--arms reuse`, for a figure of that arm alone), the RSS before the arm, the most tokens whose keys
and values the engine held at once (running rows and cached conversations, sampled every 0.2 s), the
bytes one token's keys and values take in every layer, and the columns copied from slot to slot.
Progress goes to stderr; the last stdout line is one JSON object.

    python benchmarks/chat.py --quick     # 16 chats (128 turns), a few minutes
    python benchmarks/chat.py             # 64 chats (512 turns)
    python benchmarks/chat.py --arms reuse --cache-mb 2048   # peak memory of the reuse arm alone
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from serve import load_requests, log, percentile
from transformers import GPT2Config

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config
from botkit.model.loading import load_model
from botkit.params import ChatSettings
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[2] / "shared" / "bench" / "chat_workload.jsonl"


def settings_of(turn: dict, first: dict) -> ChatSettings:
    """A chat's truncate string is a chat setting: each chat keeps its first turn's stop (it also
    separates the exchanges in its context); the length is the turn's. `unique` is off: a judged
    reply is handed out whole once judged, so its first token would come with its last."""
    return ChatSettings(
        length=turn["max_new_tokens"], temperature=0, top_k=0, top_p=1.0, truncate=first["stop"] or "", unique=False
    )


def make_config(num_chats: int) -> Config:
    config = Config()
    return dataclasses.replace(
        config,
        batch=dataclasses.replace(config.batch, max_size=num_chats, max_queue=4 * num_chats, timeout_s=7200),
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0, context_messages=20),
    )


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def kv_tokens(engine) -> int:
    """Tokens whose keys and values the engine holds: running rows and cached conversations."""
    runner = engine.runner
    cache = runner.cache
    if cache is None:
        return 0
    held = sum(cache.lengths)  # one pool: every slot's tokens, running or cached
    if not hasattr(runner, "slots"):  # before the pool (main up to issue 21 part 4): the rows, then the copies
        held += sum(len(e.tokens) for e in engine.prefix_cache.entries.values())
    return held


async def sample_memory(backend, peak: dict) -> None:
    while True:
        await asyncio.sleep(0.2)
        if backend.engine is not None:
            peak["kv_tokens"] = max(peak["kv_tokens"], kv_tokens(backend.engine))
            peak["rss_mb"] = max(peak["rss_mb"], rss_mb())


async def run_arm(lm, chats: dict[str, list[dict]], cache_mb: int | None) -> dict:
    """All chats as closed loops through one Core; returns per-turn records and the arm's figures."""
    records = []
    rss_before_mb, peak = rss_mb(), {"kv_tokens": 0, "rss_mb": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalBackend(lm, max_batch_size=len(chats), cache_mb=cache_mb) as backend:
            from botkit.serve.store import Store

            async with (
                Store.open(Path(tmp) / "bench.db") as store,
                Core(backend, store, make_config(len(chats))) as core,
            ):
                bot = Chats(core, store, core.config)

                async def one_chat(turns: list[dict]) -> None:
                    for turn in turns:
                        started = time.perf_counter()
                        ticket = await bot.submit(
                            Prompt("bench", turn["chat_id"], turn["user_id"], turn["message"]),
                            settings_of(turn, turns[0]),
                        )
                        first = None
                        async for delta in ticket.stream():
                            if first is None and delta:
                                first = time.perf_counter() - started
                        reply = await ticket.result()
                        done = time.perf_counter() - started
                        row = await store.request(ticket.request_id)
                        records.append(
                            {
                                "chat_id": turn["chat_id"],
                                "turn": turn["turn"],
                                "ttft_s": first if first is not None else done,
                                "latency_s": done,
                                "tokens": reply.num_tokens,
                                "prompt": row["prompt"],
                                "text": reply.text,
                                "prompt_tokens": row["num_prompt_tokens"],
                                "max_new_tokens": turn["max_new_tokens"],
                            }
                        )

                sampler = asyncio.create_task(sample_memory(backend, peak))
                started = time.perf_counter()
                await asyncio.gather(*(one_chat(turns) for turns in chats.values()))
                wall = time.perf_counter() - started
                sampler.cancel()
            cache = backend.engine.prefix_cache.stats()
            runner = backend.engine.runner
            memory = {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                "rss_before_mb": round(rss_before_mb),
                "sampled_peak_rss_mb": round(peak["rss_mb"]),
                "peak_kv_tokens": peak["kv_tokens"],
                "kv_bytes_per_token": 2 * lm.model.config.n_layer * lm.model.config.n_embd * lm.model.dtype.itemsize,
                "copied_tokens": getattr(runner.cache, "num_copied_tokens", None),  # None: not counted (main)
                "pool_slots": getattr(runner, "num_slots", None),
            }
    follow = [r["ttft_s"] for r in records if r["turn"] > 0]
    return {
        "records": records,
        "wall_s": wall,
        "tok_s": sum(r["tokens"] for r in records) / wall,
        "ttft_p50_s": percentile(follow, 50),
        "ttft_p99_s": percentile(follow, 99),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "reused_share": cache["reused_share"],
        "cache_mb": cache["mb"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "memory": memory,
    }


def sequential_generate(lm, records: list[dict]) -> dict:
    """One `model.generate` per prompt, greedy, the turn's max_new_tokens, one after another."""
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for r in records:
            ids = lm.tokenizer(r["prompt"], return_tensors="pt", verbose=False).input_ids[
                :, -(lm.max_context - r["max_new_tokens"]) :
            ]
            out = lm.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=r["max_new_tokens"],
                pad_token_id=lm.eos_token_id,
            )
            tokens += out.shape[1] - ids.shape[1]
    return {"tok_s": tokens / (time.perf_counter() - started), "num_prompts": len(records)}


def reuse_alone(lm, chats: dict[str, list[dict]], cache_mb: int | None) -> None:
    """The reuse arm alone in this process, so that its peak RSS is its own."""
    log(f"arm: reuse on (cache_mb {'default' if cache_mb is None else cache_mb})")
    on = asyncio.run(run_arm(lm, chats, cache_mb=cache_mb))
    log(f"  {on['tok_s']:.1f} tok/s, {on['wall_s']:.0f} s, memory {on['memory']}")
    result = {
        "memory": on["memory"],
        "reused_share": on["reused_share"],
        "cache_mb_held_at_end": on["cache_mb"],
        "cache_mb_setting": cache_mb,
        "tok_s": round(on["tok_s"], 1),
        "ttft_s": {"p50": round(on["ttft_p50_s"], 3), "p99": round(on["ttft_p99_s"], 3)},
        "wall_s": round(on["wall_s"], 1),
        "prompt_tokens": on["prompt_tokens"],
        "chats": len(chats),
        "turns": len(on["records"]),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="16 chats instead of 64")
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--chats", type=int, default=None)
    parser.add_argument(
        "--no-ctranslate2", action="store_true", help="skip the CTranslate2 arm even when it is installed"
    )
    parser.add_argument("--arms", choices=["all", "reuse"], default="all", help="reuse: that arm alone (its memory)")
    parser.add_argument(
        "--cache-mb", type=int, default=None, help="the reuse arm's [batch] cache_mb (default: botkit's)"
    )
    args = parser.parse_args()
    num_chats = args.chats or (16 if args.quick else 64)
    turns = load_requests(args.workload)
    chats: dict[str, list[dict]] = defaultdict(list)
    for turn in turns:
        if len(chats) < num_chats or turn["chat_id"] in chats:
            chats[turn["chat_id"]].append(turn)
    log(f"{len(chats)} chats, {sum(map(len, chats.values()))} turns; loading GPT-2 124M shapes (random weights)")
    lm = load_model(GPT2Config(), device="cpu", seed=0)
    if args.arms == "reuse":
        reuse_alone(lm, chats, args.cache_mb)
        return

    log("arm: reuse off")
    off = asyncio.run(run_arm(lm, chats, cache_mb=0))
    log(
        f"  {off['tok_s']:.1f} tok/s, follow-up TTFT p50 {off['ttft_p50_s']:.2f} s p99 {off['ttft_p99_s']:.2f} s, "
        f"{off['wall_s']:.0f} s"
    )
    log("arm: reuse on")
    on = asyncio.run(run_arm(lm, chats, cache_mb=args.cache_mb))
    log(
        f"  {on['tok_s']:.1f} tok/s, follow-up TTFT p50 {on['ttft_p50_s']:.2f} s p99 {on['ttft_p99_s']:.2f} s, "
        f"{on['wall_s']:.0f} s,"
        f" reused {on['reused_share']:.0%} of prompt tokens"
    )
    same = sum(
        a["text"] == b["text"]
        for a, b in zip(
            sorted(off["records"], key=lambda r: r["prompt"]),
            sorted(on["records"], key=lambda r: r["prompt"]),
            strict=True,
        )
    )
    sample = [r for r in on["records"] if r["turn"] > 0][:: max(1, len(on["records"]) // (8 if args.quick else 24))]
    log(f"arm: sequential model.generate on {len(sample)} of the same prompts")
    seq = sequential_generate(lm, sample)

    result = {
        "ttft_p50_speedup": round(off["ttft_p50_s"] / on["ttft_p50_s"], 2),
        "ttft_p99_speedup": round(off["ttft_p99_s"] / on["ttft_p99_s"], 2),
        "tok_s_ratio_reuse_vs_off": round(on["tok_s"] / off["tok_s"], 2),
        "tok_s_ratio_reuse_vs_sequential": round(on["tok_s"] / seq["tok_s"], 2),
        "reused_share": on["reused_share"],
        "tok_s": {"reuse": round(on["tok_s"], 1), "off": round(off["tok_s"], 1), "sequential": round(seq["tok_s"], 1)},
        "ttft_s": {
            "reuse_p50": round(on["ttft_p50_s"], 3),
            "reuse_p99": round(on["ttft_p99_s"], 3),
            "off_p50": round(off["ttft_p50_s"], 3),
            "off_p99": round(off["ttft_p99_s"], 3),
        },
        "wall_s": {"reuse": round(on["wall_s"], 1), "off": round(off["wall_s"], 1)},
        "prompt_tokens": on["prompt_tokens"],
        "same_text_as_off": f"{same}/{len(on['records'])}",
        "peak_rss_mb": {"after_off": off["peak_rss_mb"], "after_reuse": on["peak_rss_mb"]},
        "cache_mb": on["cache_mb"],
        "chats": len(chats),
        "turns": len(on["records"]),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    ctranslate2_chat = None
    if not args.no_ctranslate2:
        try:
            from ct2_arm import ctranslate2_chat  # optional anchor arm
        except ImportError:
            log("CTranslate2 is not installed: no CTranslate2 arm")
    if ctranslate2_chat:
        log("arm: CTranslate2 (static batches of the waiting prompts, no cache)")
        ct2 = ctranslate2_chat(lm, chats, settings_of, make_config(len(chats)))
        log(f"  {ct2['tok_s']:.1f} tok/s, {ct2['seconds']:.0f} s in {ct2['rounds']} batches")
        result["tok_s"]["ctranslate2"] = round(ct2["tok_s"], 1)
        result["tok_s_ratio_reuse_vs_ctranslate2"] = round(on["tok_s"] / ct2["tok_s"], 2)
        # Greedy, so a turn's prompt and reply are the same in both as long as every earlier reply of its chat was.
        botkit = {(r["chat_id"], r["turn"]): (r["prompt"], r["text"]) for r in on["records"]}
        same = sum(botkit[r["chat_id"], r["turn"]] == (r["prompt"], r["text"]) for r in ct2["records"])
        for chat_id in chats:
            differ = [
                r
                for r in ct2["records"]
                if r["chat_id"] == chat_id and botkit[chat_id, r["turn"]] != (r["prompt"], r["text"])
            ]
            if differ:
                first = min(differ, key=lambda r: r["turn"])
                log(
                    f"  chat {chat_id}: CTranslate2's reply differs from botkit's at turn {first['turn']}"
                    f" ({'same' if botkit[chat_id, first['turn']][0] == first['prompt'] else 'another'} prompt), "
                    f"{len(differ)} turns differ"
                )
        result["ctranslate2_same_prompt_and_text"] = f"{same}/{len(ct2['records'])}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
