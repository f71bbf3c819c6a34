"""botkit on vLLM: the own engine, vLLM directly, and botkit in front of vLLM (rules off and on), one run.

GPT-2 124M shapes (`GPT2Config()`; `--small`: 4 layers of width 256), random weights, seed 0, saved as a
Hugging Face folder with the tokenizer botkit ships, fp32, greedy. vLLM's CPU build is started by botkit
itself (`backend = "vllm"`, from the venv named by --vllm-venv, default .vllm-venv) with botkit's logits
processor loaded; the vLLM arms are skipped (one line) when that venv is missing.

Arms, one after another in this process:
- own: `botkit run` on its own engine, in its own process as vLLM's server is (LocalBackend, Core, the web
  adapter's /v1/completions; prepacked weights as served); its chat workload runs botkit's chat layer
  in this process;
- own engine alone: the same engine's steps with no HTTP, Core or store (`--engine-alone`), what serving costs;
- vllm: vLLM directly, its defaults (one core computes, one schedules);
- vllm (both cores): the same started again with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (`--vllm-both-cores`);
- front: botkit's Core on the first vLLM server (VllmBackend), the rules off (no vllm_xargs sent);
- front+rules: the same with the rules on (vllm_xargs; the processor runs its UTF-8 mask on every row).
own and the vllm arms of the shared workload go through the same closed-loop client (botkit's
RemoteClient streaming each server's /v1/completions).

Workloads:
- shared: the first 2 requests of each of 1 / 16 / 64 chats of ../shared/bench/workload.jsonl
  (the first 2C requests in order), C closed loops; useful tokens/s over the level's wall time;
- chat: the first --turns turns of the 64 chats of ../shared/bench/chat_workload.jsonl with
  `use_context` on, closed loop per chat; time to first streamed text p50 of the follow-up turns
  and tokens/s. vLLM directly replays, per chat and in order, the prompts botkit built (own's, and
  front's for the front comparison).

Greedy texts of the arms are compared request by request. Progress goes to stderr; the last stdout
line is one JSON object.

    python benchmarks/vllm.py --quick --chats 16     # levels 1 and 16, 2 turns of 16 chats
    python benchmarks/vllm.py              # levels 1, 16, 64; 2 chat turns of 64 chats
    python benchmarks/vllm.py --skip-front --vllm-both-cores   # issue 21: the own engine against vLLM
    python benchmarks/vllm.py --small      # the same with a 4-layer model (a shared, loaded machine)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import aiohttp
import torch
from chat import settings_of
from serve import in_own_thread, load_requests, log, params_of, percentile
from transformers import GPT2Config, GPT2LMHeadModel

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config, ModelConfig, VllmConfig
from botkit.engine.engine import Engine
from botkit.model.loading import load_model
from botkit.model.sources import asset_dir, resolve
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core, Who
from botkit.serve.remote import RemoteClient
from botkit.serve.store import Store
from botkit.serve.vllm_backend import VllmBackend
from botkit.serve.vllm_server import SERVER_MODULE

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
ROOT = Path(__file__).resolve().parents[1]


SMALL = GPT2Config(n_layer=4, n_head=4, n_embd=256)  # --small: for a loaded machine (head width 64, as GPT-2's)


def save_model(folder: Path, config: GPT2Config) -> Path:
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(asset_dir("gpt2") / name, folder / name)
    return folder


def make_config(model_dir: Path, num_chats: int, venv: Path, pythonpath: str, both_cores: bool = False) -> Config:
    """botkit's config for every arm; vLLM from `venv`, with botkit on `pythonpath` if it is not installed there,
    computing on both cores with `both_cores` (by default the CPU build keeps one for its scheduler)."""
    env = ([f"PYTHONPATH={pythonpath}"] if pythonpath else []) + (
        ["VLLM_CPU_NUM_OF_RESERVED_CPU=0"] if both_cores else []
    )
    command = ("env", *env, str(venv / "bin" / "python"), "-m", SERVER_MODULE) if env else ()
    config = Config(
        model=ModelConfig(backend="vllm", source=str(model_dir), max_context=1024),
        vllm=VllmConfig(venv=str(venv), command=command),
    )
    return dataclasses.replace(
        config,
        batch=dataclasses.replace(config.batch, max_size=num_chats, max_queue=4 * num_chats, timeout_s=7200),
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0, context_messages=20),
    )


def level_result(num_chats: int, num_tokens: int, seconds: float, texts: dict) -> dict:
    log(f"  {num_chats} chats: {num_tokens} tokens in {seconds:.1f} s, {num_tokens / seconds:.1f} tok/s")
    return {
        "chats": num_chats,
        "tokens": num_tokens,
        "seconds": round(seconds, 2),
        "tok_s": round(num_tokens / seconds, 1),
        "texts": texts,
    }


def engine_level(lm, requests: list[dict], num_chats: int) -> dict:
    """The own engine alone (no HTTP, no Core, no store): `num_chats` closed loops over `requests`, each
    chat's next request added when its reply ends. What serving costs is the own arm's tok/s over this."""
    engine, todo, texts, num_tokens = Engine(lm, num_chats, prepack=True), deque(requests), {}, 0
    ids = {}

    def add(request: dict) -> None:
        ids[engine.add(lm.tokenizer(request["prompt"]).input_ids, params_of(request)).id] = request["id"]

    started = time.perf_counter()
    for _ in range(min(num_chats, len(todo))):
        add(todo.popleft())
    while engine.has_work:
        for event in engine.step():
            if event.finished and event.seq.id in ids:
                texts[ids.pop(event.seq.id)] = event.seq.text
                num_tokens += len([t for t in event.seq.generated if t != lm.eos_token_id])
                if todo:
                    add(todo.popleft())
    return level_result(num_chats, num_tokens, time.perf_counter() - started, texts)


async def shared_level(core_or_client, requests: list[dict], num_chats: int) -> dict:
    """`num_chats` closed loops over `requests`, through a Core (submit_completion) or a RemoteClient."""
    todo, texts, num_tokens = deque(requests), {}, 0

    async def one(index: int) -> None:
        nonlocal num_tokens
        while todo:
            request = todo.popleft()
            if isinstance(core_or_client, Core):
                ticket = await core_or_client.submit(
                    request["prompt"],
                    params_of(request),
                    who=Who(platform="bench", chat_id=f"c{index}", user_id=f"u{index}"),
                )
                reply = await ticket.result()
                text, tokens = reply.text, reply.num_tokens
            else:
                text, tokens = await direct(core_or_client, request["prompt"], params_of(request))
            num_tokens += tokens
            texts[request["id"]] = text

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(num_chats)))
    return level_result(num_chats, num_tokens, time.perf_counter() - started, texts)


async def direct(client: RemoteClient, prompt: str, params, first_at: list | None = None) -> tuple[str, int]:
    text, last = [], None
    async for chunk in client.stream(prompt, params):
        if chunk.text and first_at is not None and not first_at:
            first_at.append(time.perf_counter())
        text.append(chunk.text)
        last = chunk
    return "".join(text), last.num_tokens


async def chat_arm(core: Core, chats: dict[str, list[dict]]) -> dict:
    records, bot = [], Chats(core, core.store, core.config)

    async def one(turns: list[dict]) -> None:
        for turn in turns:
            started = time.perf_counter()
            ticket = await bot.submit(
                Prompt("bench", turn["chat_id"], turn["user_id"], turn["message"]), settings_of(turn, turns[0])
            )
            first = None
            async for delta in ticket.stream():
                first = first or (time.perf_counter() - started if delta else None)
            reply = await ticket.result()
            records.append(
                {
                    "chat_id": turn["chat_id"],
                    "turn": turn["turn"],
                    "ttft_s": first or time.perf_counter() - started,
                    "tokens": reply.num_tokens,
                    "prompt": ticket.prompt,
                    "params": ticket.params,
                    "text": reply.text,
                }
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(turns) for turns in chats.values()))
    return summarise(records, time.perf_counter() - started)


async def chat_direct(client: RemoteClient, front_records: list[dict]) -> dict:
    """vLLM directly on the prompts botkit built, each chat's turns in order, chats at once."""
    by_chat, records = defaultdict(list), []
    for r in sorted(front_records, key=lambda r: r["turn"]):
        by_chat[r["chat_id"]].append(r)

    async def one(turns: list[dict]) -> None:
        for r in turns:
            started, first_at = time.perf_counter(), []
            text, tokens = await direct(client, r["prompt"], r["params"], first_at)
            records.append(
                {
                    "chat_id": r["chat_id"],
                    "turn": r["turn"],
                    "ttft_s": (first_at or [time.perf_counter()])[0] - started,
                    "tokens": tokens,
                    "text": text,
                }
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(turns) for turns in by_chat.values()))
    return summarise(records, time.perf_counter() - started)


def summarise(records: list[dict], wall_s: float) -> dict:
    follow = [r["ttft_s"] for r in records if r["turn"] > 0]
    log(f"  chat: {len(records)} turns in {wall_s:.1f} s, follow-up TTFT p50 {percentile(follow, 50) * 1000:.0f} ms")
    return {
        "turns": len(records),
        "tok_s": round(sum(r["tokens"] for r in records) / wall_s, 1),
        "ttft_p50_ms": round(percentile(follow, 50) * 1000),
        "ttft_p99_ms": round(percentile(follow, 99) * 1000),
        "texts": {(r["chat_id"], r["turn"]): r["text"] for r in records},
        "records": records,
    }


def same(a: dict, b: dict) -> str:
    shared = [k for k in a if k in b]
    return f"{sum(a[k] == b[k] for k in shared)}/{len(shared)}"


@contextlib.asynccontextmanager
async def botkit_run(model_dir: Path, num_chats: int, tmp: Path):
    """`botkit run` on `model_dir` in its own process, serving only its web API; yields its /v1 URL."""
    port = free_port()
    config = tmp / "botkit.toml"
    config.write_text(
        f"[model]\nsource = {json.dumps(str(model_dir))}\n"
        f"[batch]\nmax_size = {num_chats}\nmax_queue = {4 * num_chats}\ntimeout_s = 7200\n"
        "[limits]\nuser_per_minute = 0\nchat_per_minute = 0\n"
        f"[store]\npath = {json.dumps(str(tmp / 'run.db'))}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "botkit", "run", "--config", str(config), "--port", str(port), cwd=tmp
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "healthz") as response:
                        if response.status == 200:
                            break
                if process.returncode is not None:
                    raise RuntimeError("botkit run exited before it was ready")
                await asyncio.sleep(0.5)
        yield url + "v1"
    finally:
        process.terminate()
        await process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def front_arms(out, vllm, client, config, levels, requests, chats, tmp: Path, repeat: int) -> None:
    """botkit in front of vLLM, rules off and on, against vLLM directly: `repeat` rounds in alternating
    order (so drift and warm-up fall on every arm alike), each arm's median kept."""
    runs = defaultdict(list)  # (level or "chat", arm) -> results
    for rep in range(repeat):
        names = ["front", "front+rules", "vllm"]
        for name in names if rep % 2 == 0 else names[::-1]:
            if name == "vllm":
                for c in levels:
                    log(f"vLLM directly, {c} chats (round {rep + 1})")
                    runs[c, name].append(await shared_level(client, requests[: 2 * c], c))
                log(f"vLLM directly, chat workload (the front arm's prompts, round {rep + 1})")
                runs["chat", name].append(await chat_direct(client, runs["chat", "front"][0]["records"]))
                continue
            vllm.client.has_rules = name == "front+rules"
            async with Store.open(tmp / f"{name}{rep}.db") as store, Core(vllm, store, config) as core:
                for c in levels:
                    log(f"botkit in front of vLLM ({name}), {c} chats (round {rep + 1})")
                    runs[c, name].append(await shared_level(core, requests[: 2 * c], c))
                log(f"botkit in front of vLLM ({name}), chat workload (round {rep + 1})")
                runs["chat", name].append(await chat_arm(core, chats))
    for (where, name), got in runs.items():
        median = dict(got[0])  # texts of the first round; figures the median of the rounds
        for key in ("tok_s", "ttft_p50_ms", "ttft_p99_ms"):
            if key in median:
                median[key] = statistics.median(r[key] for r in got)
        median["rounds"] = [r["tok_s"] for r in got]
        if where == "chat":
            out["chat"]["vllm (front's prompts)" if name == "vllm" else name] = median
        else:
            out["levels"][where][name] = median


async def run(args) -> dict:
    requests = load_requests(args.workload)
    turns = [t for t in load_requests(args.chat_workload) if t["turn"] < args.turns]
    chats = defaultdict(list)
    for t in turns:
        if t["chat_id"] in chats or len(chats) < args.chats:
            chats[t["chat_id"]].append(t)
    levels = tuple(args.levels or ((1, 16) if args.quick else (1, 16, 64)))
    max_chats = max(levels[-1], len(chats))
    out = {"levels": {}, "chat": {}, "model": "small (4 x 256)" if args.small else "gpt2-124m shapes"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = in_own_thread(save_model, tmp / "gpt2", SMALL if args.small else GPT2Config())
        config = make_config(model_dir, max_chats, args.vllm_venv, args.pythonpath)
        for c in levels:
            out["levels"][c] = {}
        if not args.skip_own:
            async with botkit_run(model_dir, max_chats, tmp) as url:  # its own process, as vLLM's server is
                async with RemoteClient(url, max_concurrency=max_chats, timeout_s=7200) as client:
                    client.has_rules = False  # the same requests as vLLM's direct arm
                    for c in levels:
                        log(f"own engine (botkit run's /v1/completions), {c} chats")
                        out["levels"][c]["own"] = await shared_level(client, requests[: 2 * c], c)
            lm = in_own_thread(lambda: load_model(str(model_dir), device="cpu"))
            async with (
                Store.open(tmp / "own.db") as store,
                LocalBackend(lm, max_batch_size=max_chats) as backend,
                Core(backend, store, config) as core,
            ):
                log("own engine, chat workload (botkit's chat layer in this process)")
                out["chat"]["own"] = await chat_arm(core, chats)
            del backend  # its engine's memory
            if args.engine_alone:
                for c in levels:
                    log(f"own engine alone (no HTTP, core or store), {c} chats")
                    out["levels"][c]["own engine alone"] = in_own_thread(engine_level, lm, requests[: 2 * c], c)
            del lm
        if not (args.vllm_venv / "bin" / "python").is_file():
            log(f"no vLLM venv at {args.vllm_venv}: the vLLM arms are skipped (scripts/vllm_venv.sh makes one)")
            return out
        for both_cores in (False, True) if args.vllm_both_cores else (False,):
            suffix = " (both cores)" if both_cores else ""
            config = make_config(model_dir, max_chats, args.vllm_venv, args.pythonpath, both_cores)
            started = time.perf_counter()
            async with VllmBackend.from_config(config, resolve(str(model_dir))) as vllm:
                out["vllm_start_s"] = round(time.perf_counter() - started, 1)
                log(f"vLLM{suffix} ready in {out['vllm_start_s']} s")
                client = RemoteClient(vllm.server.url, model=vllm.name, max_concurrency=max_chats, timeout_s=7200)
                async with client:
                    client.has_rules = False  # vLLM alone: no botkit arguments
                    for c in levels:
                        log(f"vLLM{suffix} directly, {c} chats")
                        out["levels"][c]["vllm" + suffix] = await shared_level(client, requests[: 2 * c], c)
                    if "chat" in out and "own" in out["chat"]:
                        log(f"vLLM{suffix} directly, chat workload (the own arm's prompts)")
                        out["chat"]["vllm" + suffix] = await chat_direct(client, out["chat"]["own"]["records"])
                    if not (both_cores or args.skip_front):
                        await front_arms(out, vllm, client, config, levels, requests, chats, tmp, args.repeat)
    return out


def report(out: dict) -> dict:
    figures = {"model": out["model"], "levels": {}, "chat": {}, "vllm_start_s": out.get("vllm_start_s")}
    for c, arms in out["levels"].items():
        figures["levels"][c] = {name: arm["tok_s"] for name, arm in arms.items()}
        first = next(iter(arms.values()), None)
        if first is not None:
            figures["levels"][c]["same_texts"] = {
                name: same(first["texts"], arm["texts"]) for name, arm in arms.items()
            }
    for name, arm in out["chat"].items():
        figures["chat"][name] = {key: arm[key] for key in ("tok_s", "ttft_p50_ms", "ttft_p99_ms")}
    top, chat = out["levels"][max(out["levels"])], out["chat"]

    def ratio(a: dict, b: dict, name: str, key: str) -> float | None:
        return round(a[name][key] / b[name][key], 3) if name in a and name in b else None

    for vllm in ("vllm", "vllm (both cores)"):  # issue 21: the own engine against vLLM, tok/s and chat TTFT p50
        if vllm in top and "own" in top:
            figures[f"own_vs_{vllm}_tok_s"] = round(top["own"]["tok_s"] / top[vllm]["tok_s"], 3)
        if vllm in chat and "own" in chat:
            figures[f"own_vs_{vllm}_chat_ttft_p50"] = round(chat["own"]["ttft_p50_ms"] / chat[vllm]["ttft_p50_ms"], 3)
    if "front" in top and "vllm" in top:  # issue 20: botkit in front of vLLM against vLLM directly
        figures["front_vs_vllm_tok_s"] = round(top["front"]["tok_s"] / top["vllm"]["tok_s"], 3)
        figures["rules_cost_tok_s"] = round(1 - top["front+rules"]["tok_s"] / top["front"]["tok_s"], 3)
        direct = chat["vllm (front's prompts)"]
        figures["front_vs_vllm_chat_ttft_p50"] = round(chat["front"]["ttft_p50_ms"] / direct["ttft_p50_ms"], 3)
        figures["rules_cost_chat_ttft_p50"] = round(
            chat["front+rules"]["ttft_p50_ms"] / chat["front"]["ttft_p50_ms"] - 1, 3
        )
        figures["chat_same_texts_as_front"] = {
            name: same(chat["front"]["texts"], chat[name]["texts"]) for name in chat if name != "own"
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="levels 1 and 16 only")
    parser.add_argument("--skip-own", action="store_true", help="only the vLLM arms")
    parser.add_argument("--skip-front", action="store_true", help="no botkit-in-front-of-vLLM arms")
    parser.add_argument("--engine-alone", action="store_true", help="the own engine's steps alone, as an arm")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the front comparison (alternating order)")
    parser.add_argument("--levels", type=int, nargs="+", default=None, help="chats per level (default 1 16 64)")
    parser.add_argument(
        "--vllm-both-cores", action="store_true", help="vLLM directly again, computing on both cores (a second start)"
    )
    parser.add_argument("--small", action="store_true", help="a 4-layer, width-256 GPT-2 instead of 124M's shapes")
    parser.add_argument("--turns", type=int, default=2, help="chat turns per chat (of 8)")
    parser.add_argument("--chats", type=int, default=64, help="chats of the chat workload (of 64)")
    parser.add_argument("--workload", type=Path, default=SHARED / "workload.jsonl")
    parser.add_argument("--chat-workload", type=Path, default=SHARED / "chat_workload.jsonl")
    parser.add_argument("--vllm-venv", type=Path, default=ROOT / ".vllm-venv")
    parser.add_argument(
        "--pythonpath", default="", help="a folder holding botkit for vLLM's venv (pip install --no-deps --target)"
    )
    args = parser.parse_args()
    figures = report(asyncio.run(run(args)))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
