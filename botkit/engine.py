"""The generation engine: continuous batching over GPT-2's KV cache, one forward pass per step.

Why our own loop rather than transformers' `ContinuousBatchingManager`: that manager has no
per-request stop strings or seeds, and on this 2-core CPU it reached 2.2x sequential `generate` on
the shared workload (FACTS.md); through botkit's core this loop reaches 5.5-6.1x at 64 chats
(`benchmarks/serve.py`, BENCHMARKS.md). The model forward is transformers'; only the batching and
the cache layout (kvcache.py) are ours.

Each step is one forward pass over a flat list of tokens: the next token of every running row,
then the whole prompt of each waiting sequence that joins (no padding, and the running rows share
the prompts' pass over the weights). A row that hits its stop string, end of text or length leaves
at once and its slot is free for the next step. Not thread-safe: one thread owns it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field

import torch

from .kvcache import SlotCache, register_attention
from .models import LoadedModel
from .params import SamplingParams
from .sampling import apply_repetition_penalty, sample_next

log = logging.getLogger("botkit")

MAX_JOIN_TOKENS = 1024  # prompt tokens that join in one step at most: the running rows wait for them, and
# matmuls of about this many rows run near this CPU's peak (of 4096 rows, at half of it)


@dataclass
class Sequence:
    """One sample being generated. `text` is the generated text so far (prompt excluded)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    seed: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    num_emitted: int = 0  # characters of text already handed out as deltas
    offset: int = 0  # tokens dropped from the front of prompt_ids + generated (window slides)
    finish_reason: str | None = None  # "stop" (stop string or end of text) | "length" | "cancelled"

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def context(self) -> list[int]:
        return (self.prompt_ids + self.generated)[self.offset :]


@dataclass
class Event:
    seq: Sequence
    delta: str  # new text since the last event
    finished: bool


class Engine:
    def __init__(self, lm: LoadedModel, max_batch_size: int = 32):
        self.lm = lm
        self.model = lm.model
        self.model.set_attn_implementation(register_attention())  # SDPA, except in our steps: each row reads only its own columns
        self.window = lm.max_context
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.model.device)  # see step()
        self.max_batch_size = max_batch_size
        self.eos = lm.eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # rows[i] lives in cache row i
        self.cache: SlotCache | None = None
        self.num_forward_passes = 0
        self._ids = itertools.count()

    # -- what callers use -------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams, seq_id: int | None = None) -> Sequence:
        """Queue a sample. A prompt longer than the window keeps its last tokens."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(next(self._ids) if seq_id is None else seq_id, list(prompt_ids) or [self.eos], params,
                       torch.Generator().manual_seed(seed), seed)
        max_prompt = self.window - min(params.max_new_tokens, self.window // 2)
        if len(seq.prompt_ids) > max_prompt:
            log.warning("A prompt of %d tokens is longer than the window allows; keeping its last %d.", len(seq.prompt_ids), max_prompt)
            seq.offset = len(seq.prompt_ids) - max_prompt
        self.waiting.append(seq)
        return seq

    def resume(self, seq: Sequence) -> None:
        """Continue a sequence interrupted in another engine: same tokens so far, same random stream."""
        if len(seq.context) >= self.window:
            seq.offset = len(seq.prompt_ids) + len(seq.generated) - self.window // 2
        seq.finish_reason = None
        self.waiting.append(seq)

    @torch.inference_mode()  # the cache's tensors are inference tensors: moving a row needs the mode
    def cancel(self, seq_id: int) -> Sequence | None:
        for seq in [*self.waiting, *self.rows]:
            if seq.id == seq_id:
                seq.finish_reason = "cancelled"
                if seq in self.waiting:
                    self.waiting.remove(seq)
                else:
                    self._drop_rows([self.rows.index(seq)])
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    def reset(self) -> list[Sequence]:
        """Forget every sequence (after a failed step); returns them."""
        lost = [*self.rows, *self.waiting]
        self.rows, self.waiting, self.cache = [], deque(), None
        return lost

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One forward pass: every running row decodes a token and waiting sequences join."""
        events: list[Event] = []
        if self.rows:
            self._slide_full_rows()
        decoding, joining = list(self.rows), self._take_joining()
        self.rows.extend(joining)  # before the forward: a failed step must still know them (reset)
        if not self.rows:
            return events
        lengths = self.cache.lengths if self.cache else []
        cache = self._ensure_cache(max([n + 1 for n in lengths] + [len(seq.context) for seq in joining]))
        step = cache.begin([len(seq.context) for seq in joining])
        ids = [seq.last_token for seq in decoding] + [t for seq in joining for t in seq.context]
        positions = cache.lengths + [p for seq in joining for p in range(len(seq.context))]
        last = list(range(len(decoding))) + [start + n - 1 for _, start, n in step.joins]  # the tokens that predict
        device = self.model.device
        # The 4-D "mask" only makes transformers skip building one: rows_attention masks by `step`.
        out = self.model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                         attention_mask=self.no_mask, cache=cache, use_cache=True,
                         logits_to_keep=torch.tensor(last, device=device), step=step)
        cache.end()
        self.num_forward_passes += 1
        self._accept(list(range(len(self.rows))), out.logits[0], events)
        return events

    # -- internals --------------------------------------------------------------------------

    def _ensure_cache(self, columns: int) -> SlotCache:
        if self.cache is None:
            device = self.model.device
            # On CPU a full-window buffer costs only the pages rows write; on a GPU memory is real: grow.
            capacity = self.window if device.type == "cpu" else min(self.window, columns + 128)
            self.cache = SlotCache(self.model.config, self.max_batch_size, capacity, self.model.dtype, device)
        elif self.cache.capacity < columns:
            self.cache.grow(min(self.window, max(columns, 2 * self.cache.capacity)))
        return self.cache

    def _take_joining(self) -> list[Sequence]:
        """Waiting sequences that join this step: as many as free rows and the step's token budget allow
        (the first one always fits)."""
        free = self.max_batch_size - len(self.rows)
        budget, joining = MAX_JOIN_TOKENS, []
        while self.waiting and len(joining) < free and (not joining or len(self.waiting[0].context) <= budget):
            seq = self.waiting.popleft()
            budget -= len(seq.context)
            joining.append(seq)
        return joining

    def _slide_full_rows(self) -> None:
        """A row whose next token would fall outside the window restarts on its last half-window."""
        full = [i for i, n in enumerate(self.cache.lengths) if n >= self.window]
        for i in full:
            seq = self.rows[i]
            seq.offset = len(seq.prompt_ids) + len(seq.generated) - self.window // 2
            self.waiting.appendleft(seq)  # its prefill yields its next token: nothing is skipped
        if full:
            self._drop_rows(full)

    def _accept(self, rows: list[int], logits: torch.Tensor, events: list[Event]) -> None:
        """Sample one token for each of `rows` (logits (len(rows), vocab)) and retire finished rows."""
        logits = logits.float()
        seqs = [self.rows[r] for r in rows]
        for i, seq in enumerate(seqs):
            if seq.params.repetition_penalty != 1.0:
                apply_repetition_penalty(logits, i, torch.tensor(seq.context, device=logits.device), seq.params.repetition_penalty)
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        done = []
        for r, seq, token in zip(rows, seqs, tokens, strict=True):
            if token == self.eos:
                seq.finish_reason = "stop"
            else:
                seq.generated.append(token)
                self._update_text(seq)
                if seq.finish_reason is None and len(seq.generated) >= seq.params.max_new_tokens:
                    seq.finish_reason = "length"
            delta = self._take_delta(seq)
            if seq.finish_reason:
                done.append(r)
            if delta or seq.finish_reason:
                events.append(Event(seq, delta, seq.finish_reason is not None))
        if done:
            self._drop_rows(done)

    def _update_text(self, seq: Sequence) -> None:
        text = self.lm.tokenizer.decode(seq.generated)
        stops = seq.params.stop
        if stops:
            longest = max(map(len, stops))
            since = max(0, len(seq.text) - longest)
            cuts = [i for i in (text.find(s, since) for s in stops) if i >= 0]
            if cuts:
                seq.text, seq.finish_reason = text[: min(cuts)], "stop"
                return
        seq.text = text

    def _take_delta(self, seq: Sequence) -> str:
        """New text that is safe to hand out: no half-decoded character, no possible stop-string start."""
        text = seq.text.rstrip("\ufffd")  # a multi-byte character not complete yet (or cut off at the end)
        if seq.finish_reason:
            seq.text = text
        else:
            hold = max(map(len, seq.params.stop), default=1) - 1  # a stop string may be starting here
            text = text[: len(text) - hold] if hold else text
        delta = text[seq.num_emitted :]
        seq.num_emitted = max(seq.num_emitted, len(text))
        return delta

    def _drop_rows(self, rows: list[int]) -> None:
        """Free rows: each hole is filled by the current last row (one row copied)."""
        for r in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if r != last:
                self.cache.move_row(last, r)
                self.rows[r] = self.rows[last]
            self.rows.pop()
            self.cache.pop_row()
