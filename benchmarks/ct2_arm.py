"""CTranslate2 as the benchmarks' anchor: what a CPU user would pick instead of botkit to serve GPT-2.

Optional (`pip install ctranslate2`), never a botkit dependency: importing this module without it
raises ImportError, which the benchmarks take as "no CTranslate2 arm".

Served the way a CTranslate2 user would (it has no continuous batching and no cache across calls):
- the model is converted once by CTranslate2's own `TransformersConverter` (the in-memory transformers
  model and its tokenizer saved to a folder first), then loaded as a `Generator` with compute type
  `float32`, or `int8` (weights quantized as they load), on the same number of threads as torch;
- each round of a closed loop is one `generate_batch` over the prompts waiting: greedy (beam 1,
  top-k 1), `include_prompt_in_result=False` (its documented faster way for long prompts: the batch's
  shortest prompt is forwarded at once, the rest of each prompt in the decoding loop), `max_length`
  the batch's largest reply length, `end_token` end of text. `generate_batch` takes one length and one
  end token per call, so its per-token callback ends each row at its own `max_new_tokens` or once its
  text holds its stop string (the row then leaves the batch, as CTranslate2 drops finished rows).
Useful tokens are each reply's generated tokens up to the one that completes its stop string, end of
text excluded: what botkit's engine and the sequential baseline count.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import ctranslate2
import torch

from botkit.config import Config
from botkit.model.loading import LoadedModel
from botkit.params import ChatSettings
from botkit.prompting import build_prompt, clean_message, history_to_keep
from botkit.serve.store import BLANK

CHECK_NEW_TOKENS = 16


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def convert(lm: LoadedModel, folder: Path) -> Path:
    """`lm` as a CTranslate2 model under `folder` (float32 weights; int8 is chosen when loading).
    Checked: CTranslate2's greedy tokens equal transformers' on a few prompts, else RuntimeError."""
    hf = folder / "hf"
    lm.model.save_pretrained(hf)
    lm.tokenizer.save_pretrained(hf)
    out = Path(ctranslate2.converters.TransformersConverter(str(hf)).convert(str(folder / "ct2"), force=True))
    generator = load(out, "float32")
    prompts = [lm.tokenizer(text).input_ids for text in ("Hello world", "In the beginning God created", "\n\n1:1 And")]
    got = [ids for ids, _ in generate(generator, lm, [(p, CHECK_NEW_TOKENS, "") for p in prompts])]
    with torch.inference_mode():
        want = [
            lm.model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=CHECK_NEW_TOKENS,
                pad_token_id=lm.eos_token_id,
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    want = [w[: w.index(lm.eos_token_id)] if lm.eos_token_id in w else w for w in want]
    if got != want:
        raise RuntimeError(f"CTranslate2's greedy tokens differ from transformers' after conversion: {got} != {want}")
    return out


def load(model_dir: Path, compute_type: str) -> ctranslate2.Generator:
    """One generator on torch's thread count (botkit's), one batch at a time."""
    return ctranslate2.Generator(
        str(model_dir), device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=torch.get_num_threads()
    )


def generate(
    generator: ctranslate2.Generator, lm: LoadedModel, jobs: list[tuple[list[int], int, str]]
) -> list[tuple[list[int], str]]:
    """One `generate_batch` over `jobs` (prompt ids, max_new_tokens, stop string or ""), greedy;
    returns each row's (useful token ids, text cut at its stop string)."""
    tokenizer, eos = lm.tokenizer, lm.eos_token_id
    generated: list[list[int]] = [[] for _ in jobs]

    def on_token(step) -> bool:  # True ends this row
        ids = generated[step.batch_id]
        if step.token_id == eos:
            return True
        ids.append(step.token_id)
        _, max_new_tokens, stop = jobs[step.batch_id]
        return len(ids) >= max_new_tokens or bool(stop) and stop in tokenizer.decode(ids)

    generator.generate_batch(
        [tokenizer.convert_ids_to_tokens(prompt) for prompt, _, _ in jobs],
        max_length=max(n for _, n, _ in jobs),
        beam_size=1,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=[eos],
        callback=on_token,
    )
    replies = []
    for ids, (_, _, stop) in zip(generated, jobs, strict=True):
        text = tokenizer.decode(ids)
        replies.append((ids, (text[: text.index(stop)] if stop and stop in text else text).rstrip("\ufffd")))
    return replies


def ctranslate2_serve(generator: ctranslate2.Generator, lm: LoadedModel, requests: list[dict], num_chats: int) -> dict:
    """Closed loop of `num_chats` chats over `requests` (serve.py's): every chat waits for its reply,
    so each round is one batch of the next request of every chat. Returns tok/s and texts by id."""
    todo, texts, num_tokens = deque(requests), {}, 0
    start = time.perf_counter()
    while todo:
        batch = [todo.popleft() for _ in range(min(num_chats, len(todo)))]
        jobs = [(lm.tokenizer(r["prompt"]).input_ids, r["max_new_tokens"], r["stop"] or "") for r in batch]
        for request, (ids, text) in zip(batch, generate(generator, lm, jobs), strict=True):
            num_tokens += len(ids)
            texts[request["id"]] = text
    seconds = time.perf_counter() - start
    return {"tokens": num_tokens, "seconds": seconds, "tok_s": num_tokens / seconds, "texts": texts}


class ChatPrompts:
    """Each chat's prompt as botkit's Core builds it with `use_context` on (core.py `_chat_prompt` and
    `_stable_history`, the store's `context` and `keep_newest_context`), from the chat's own exchanges."""

    def __init__(self, lm: LoadedModel, config: Config):
        self.lm, self.config = lm, config
        self.exchanges: dict[str, list[tuple[str, str]]] = {}  # every answered turn, oldest first
        self.since: dict[str, int] = {}  # index of the first exchange still in context

    def count_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer(text, verbose=False).input_ids)

    def build(self, chat_id: str, message: str, settings: ChatSettings) -> tuple[str, str]:
        """(cleaned message, full prompt) of a turn."""
        text = clean_message(message, self.config.limits.max_message_chars)
        budget, limit = self.lm.max_context - settings.length, self.config.limits.context_messages
        separator = settings.truncate or "\n"
        done = self.exchanges.setdefault(chat_id, [])
        indexed = [(i, pair) for i, pair in enumerate(done) if i >= self.since.get(chat_id, 0) and pair[1].strip(BLANK)]
        indexed = indexed[-(limit + 1) :]  # the store's context(limit + 1): non-blank replies only
        keep = len(indexed) if len(indexed) <= limit else limit // 2
        history = [pair for _, pair in indexed[len(indexed) - keep :]]
        keep = history_to_keep(settings.template, text, history, separator, budget, self.count_tokens)
        if keep < len(indexed) and keep < len(done):
            # keep_newest_context: the context restarts after the (keep + 1)-th newest answered turn, blank or not
            self.since[chat_id] = max(self.since.get(chat_id, 0), len(done) - keep)
        history = [pair for _, pair in indexed[len(indexed) - keep :]]
        return text, build_prompt(settings.template, text, history, separator, budget, self.count_tokens)

    def answered(self, chat_id: str, text: str, reply: str) -> None:
        self.exchanges.setdefault(chat_id, []).append((text, reply))


def ctranslate2_chat(
    lm: LoadedModel,
    chats: dict[str, list[dict]],
    settings_of: Callable[[dict, dict], ChatSettings],
    config: Config | None = None,
    compute_type: str = "float32",
) -> dict:
    """chat.py's workload on CTranslate2: all chats as closed loops, each round one `generate_batch`
    over every chat's next turn (its prompt built as botkit's Core would, no cache across calls)."""
    config = config or Config()
    with tempfile.TemporaryDirectory() as tmp:
        generator = load(convert(lm, Path(tmp)), compute_type)
        prompts = ChatPrompts(lm, config)
        position = dict.fromkeys(chats, 0)
        records, rounds = [], 0
        start = time.perf_counter()
        while waiting := [c for c, turns in chats.items() if position[c] < len(turns)]:
            jobs, asked = [], []
            for chat_id in waiting:
                turns = chats[chat_id]
                turn, settings = turns[position[chat_id]], settings_of(turns[position[chat_id]], turns[0])
                text, prompt = prompts.build(chat_id, turn["message"], settings)
                ids = lm.tokenizer(prompt, verbose=False).input_ids or [lm.eos_token_id]
                max_prompt = lm.max_context - min(settings.length, lm.max_context // 2)  # as botkit's Engine.add
                jobs.append((ids[-max_prompt:], settings.length, settings.truncate))
                asked.append((turn, text, prompt))
            for (turn, text, prompt), (ids, reply) in zip(asked, generate(generator, lm, jobs), strict=True):
                prompts.answered(turn["chat_id"], text, reply)
                position[turn["chat_id"]] += 1
                records.append(
                    {
                        "chat_id": turn["chat_id"],
                        "turn": turn["turn"],
                        "prompt": prompt,
                        "text": reply,
                        "tokens": len(ids),
                    }
                )
            rounds += 1
        seconds = time.perf_counter() - start
        del generator
    num_tokens = sum(r["tokens"] for r in records)
    return {
        "tok_s": num_tokens / seconds,
        "tokens": num_tokens,
        "seconds": seconds,
        "rounds": rounds,
        "compute_type": compute_type,
        "records": records,
    }
