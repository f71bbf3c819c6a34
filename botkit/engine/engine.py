"""The generation engine: continuous batching over GPT-2's KV cache, one forward pass per step.

Why our own loop rather than transformers' `ContinuousBatchingManager`: that manager has no
per-request stop strings or seeds, and on this 2-core CPU it reached 2.2x sequential `generate` on
the shared workload (FACTS.md); through botkit's core this loop reaches 5.5-6.1x at 64 chats
(`benchmarks/serve.py`, BENCHMARKS.md). The model forward is transformers'; only the batching and
the cache layout (kvcache.py) are ours.

Each step is one forward pass over a flat list of tokens: the next token of every running row,
then the new tokens of each waiting sequence that joins (no padding, and the running rows share the
prompts' pass over the weights). A joining prompt that extends a recently finished sequence (a
chat's next turn) starts from that sequence's keys and values (prefix_cache.py) and prefills only
its new tokens. A row that hits its stop string, end of text or length leaves at once and its slot
is free for the next step.

A `unique` row never draws a token that would make its last 8 tokens a run of its model's training
text (copy_index.py; the token is masked and the row draws again), so its reply shares no
8-token span with the training text by construction. A finished sample may be judged before anyone
sees it (judging.py): one holding a banned word or copying its prompt (or, in fewer tokens, its
training text) is drawn again in its own row (the prompt's keys and values
stay; only its length is rewound), and `candidates` samples of one request join as one prompt whose
keys and values the others copy, then compete. Their text is handed out once, when judged.

A step that raises fails no one at first: its sequences are split in two groups, each run alone in
its next step, halving again until the one that fails alone is failed; the others rejoin the batch
after one good step. The caller's thread goes on reading its inbox between steps, so cancellations,
timeouts and new requests are never held up by a retry. Not thread-safe: one thread owns it.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from botkit.engine import judging
from botkit.engine.kvcache import SlotCache, register_attention
from botkit.engine.prefix_cache import PrefixCache
from botkit.engine.rules import RowRules, RuleContext, apply_rules, redraw_training_runs
from botkit.engine.sampling import sample_next
from botkit.engine.token_bytes import Detokenizer, TokenBytes
from botkit.model.loading import LoadedModel
from botkit.params import SamplingParams

log = logging.getLogger("botkit")
MAX_JOIN_TOKENS = 1024  # new prompt tokens that join in one step at most: the running rows wait for them, and
# matmuls of about this many rows run near this CPU's peak (of 4096 rows, at half of it)


@dataclass(eq=False)  # one sequence is equal to itself only (`seq in rows` must not compare token lists)
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
    finish_reason: str | None = None  # "stop" (stop string or end of text) | "length" | "cancelled" | "error"
    error: str = ""  # why it failed, when finish_reason is "error"
    num_reused: int = 0  # prompt tokens whose keys and values came from the prefix cache
    num_failed_alone: int = 0  # steps that failed with only this sequence in them
    detok: Detokenizer | None = None
    rules: RowRules | None = None  # its per-token rules' state (rules.py)
    group: list[Sequence] | None = None  # the candidates of its request, leader first
    attempts: list[judging.Attempt] = field(default_factory=list)  # judged draws so far
    result: judging.Attempt | None = None  # what the request sends, once judged
    logprob_sum: float = 0.0  # of its generated tokens under the model, while judged (nats)
    start_offset: int = 0
    is_reusable: bool = True  # kept in the prefix cache when it finishes (not after a /forget while it ran)

    @property
    def is_judged(self) -> bool:
        p = self.params
        return bool(p.banned_words or p.unique or p.candidates > 1)

    @property
    def leader(self) -> Sequence:
        return self.group[0] if self.group else self

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


def default_cache_mb(device: torch.device, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """A quarter of the memory botkit may use (the GPU's on CUDA) for conversation reuse: the machine's,
    or its container's limit (cgroup v2 memory.max, v1 memory.limit_in_bytes) when that is lower."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4 // 2**20
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(physical, _cgroup_limit_bytes(cgroup_root) or physical) // 4 // 2**20


def _cgroup_limit_bytes(root: Path) -> int | None:
    """The container's memory limit, or None when there is none (or it cannot be read)."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            continue
        return int(text) if text.isdigit() else None  # "max": no limit (v1 writes a huge number instead)
    return None


class Engine:
    def __init__(self, lm: LoadedModel, max_batch_size: int = 32, *, cache_mb: int | None = None,
                 before_step: Callable[[list[Sequence]], None] | None = None, padded_decode: bool | None = None,
                 mask_utf8: bool = True):
        """`cache_mb`: memory for conversation reuse (None: default_cache_mb; 0: off). `before_step`
        is called with a step's sequences before its forward pass (fault injection in tests).
        `padded_decode`: decode attention as one padded call per layer (default: on a GPU only).
        `mask_utf8=False` lets a row sample bytes that are not UTF-8 (only to measure what the mask prevents)."""
        self.lm = lm
        self.model = lm.model
        self.model.set_attn_implementation(register_attention())  # SDPA, except in our steps: each row reads only its own columns
        self.window = lm.max_context
        device = self.model.device
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # see _forward()
        self.max_batch_size = max_batch_size
        self.eos = lm.eos_token_id
        self.token_bytes = TokenBytes.of(lm.tokenizer)
        self.mask_utf8 = mask_utf8 and self.token_bytes is not None
        self.prefix_cache = PrefixCache((default_cache_mb(device) if cache_mb is None else cache_mb) * 2**20)
        self.padded_decode = device.type == "cuda" if padded_decode is None else padded_decode
        self.before_step = before_step
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # rows[i] lives in cache row i
        self.quarantine: deque[list[Sequence]] = deque()  # groups of a failed step, each to run alone
        self.cache: SlotCache | None = None
        self.num_forward_passes = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (not reused)
        self._step_prompt_tokens = 0
        self._ids = itertools.count()
        self._not_reusable_ids: set[int] = set()  # requests queued elsewhere when /forget ran (drop_cached_prefixes)

    # -- what callers use -------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams, seq_id: int | None = None) -> Sequence:
        """Queue a request: one sample, or `params.candidates` of them. Returns the one whose `text`
        (and `result`, when judged) is the request's. A prompt longer than the window keeps its last tokens."""
        request_id = next(self._ids) if seq_id is None else seq_id
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = [self._new_sequence(request_id, prompt_ids, params, seed + i) for i in range(params.candidates)]
        if request_id in self._not_reusable_ids:
            self._not_reusable_ids.discard(request_id)
            for seq in seqs:
                seq.is_reusable = False
        if len(seqs) > 1:
            for seq in seqs:
                seq.group = seqs
        self.waiting.extend(seqs)
        return seqs[0]

    def _new_sequence(self, request_id: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> Sequence:
        seq = Sequence(request_id, list(prompt_ids) or [self.eos], params, torch.Generator(), seed)  # candidates of one request share its id
        seq.generator.manual_seed(_fold_seed(seed))
        seq.detok = self.token_bytes.detokenizer() if self.token_bytes else None
        max_prompt = self.window - min(params.max_new_tokens, self.window // 2)
        if len(seq.prompt_ids) > max_prompt:
            log.warning("A prompt of %d tokens is longer than the window allows; keeping its last %d.", len(seq.prompt_ids), max_prompt)
            seq.offset = seq.start_offset = len(seq.prompt_ids) - max_prompt
        seq.rules = self._new_rules(seq)
        return seq

    @torch.inference_mode()  # the cache's tensors are inference tensors: moving a row needs the mode
    def cancel(self, seq_id: int) -> Sequence | None:
        """Stop the request `seq_id` (all its candidates); returns its leading sequence."""
        found = [s for s in {*self.waiting, *self.rows, *itertools.chain(*self.quarantine)} if s.id == seq_id]
        for seq in found:
            seq.finish_reason = "cancelled"
            self._forget(seq)
        return found[0].leader if found else None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows or self.quarantine)

    def reset(self) -> list[Sequence]:
        """Forget every sequence (at shutdown); returns them."""
        lost = [*self.rows, *self.waiting, *itertools.chain(*self.quarantine)]
        self.rows, self.waiting, self.quarantine, self.cache = [], deque(), deque(), None
        return lost

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One forward pass: running rows decode a token and waiting sequences join; while a failed
        step is being narrowed down, only its next group runs."""
        if self.quarantine:
            group = self.quarantine.popleft()
            decoding = [s for s in group if s in self.rows]
            joining = [s for s in group if s not in self.rows]
        else:
            group = None
            decoding, joining = list(self.rows), self._take_joining()
        decoding, joining = self._slide_full_rows(decoding, joining)
        if not decoding and not joining:
            return []
        states = [s.generator.get_state() for s in decoding + joining]  # a failed step must not move a random stream
        try:
            if self.before_step:
                self.before_step(decoding + joining)
            logits = self._forward(decoding, joining)
            tokens = self._sample(decoding + joining, logits)
        except Exception as exc:  # noqa: BLE001 - keep serving; narrow the fault down to its sequence
            return self._step_failed(decoding, joining, states, exc)
        self.cache.end()
        self.num_forward_passes += 1
        self.num_prompt_tokens_computed += self._step_prompt_tokens
        return self._commit(decoding + joining, tokens)

    # -- a step -------------------------------------------------------------------------------

    def _take_joining(self) -> list[Sequence]:
        """Waiting sequences that join this step: as many as free rows and the step's token budget allow
        (the first one always fits)."""
        free = self.max_batch_size - len(self.rows)
        budget, joining = MAX_JOIN_TOKENS, []
        for seq in list(self.waiting):
            if len(joining) >= free or (joining and len(seq.context) > budget):
                break
            if seq.leader is not seq and not seq.generated and seq.leader in joining:
                continue  # a candidate joins after its leader's prompt is in, and copies its keys and values
            self.waiting.remove(seq)
            budget -= len(seq.context)
            joining.append(seq)
        return joining

    def _slide_full_rows(self, decoding: list[Sequence], joining: list[Sequence]) -> tuple[list, list]:
        """A row whose next token would fall outside the window restarts on its last half-window (its
        prefill yields its next token: nothing is skipped)."""
        full = [s for s in decoding if self.cache.lengths[self.rows.index(s)] >= self.window]
        for seq in full:
            seq.offset = len(seq.prompt_ids) + len(seq.generated) - self.window // 2
            self._drop_rows([self.rows.index(seq)])
        return [s for s in decoding if s not in full], joining + full

    def _forward(self, decoding: list[Sequence], joining: list[Sequence]) -> torch.Tensor:
        """The model over the step's flat token list; returns (rows, vocab) logits, decode rows first."""
        reused = [self._reuse(seq) for seq in joining]  # (kv, past) or (None, 0) for each
        needed = [self.cache.lengths[self.rows.index(s)] + 1 for s in decoding] + [len(s.context) for s in joining]
        cache = self._ensure_cache(max(needed))
        first_row = len(self.rows)
        self.rows.extend(joining)  # before the forward: a failed step must still know them
        for i, (source, past) in enumerate(reused):
            if isinstance(source, int):
                cache.copy_row(source, first_row + i, past)
            elif past:
                cache.write_row(first_row + i, source, past)
        step = cache.begin([self.rows.index(s) for s in decoding], [(past, len(s.context) - past) for s, (_, past) in zip(joining, reused, strict=True)],
                           padded=self.padded_decode)
        ids = [s.last_token for s in decoding] + [t for s, (_, past) in zip(joining, reused, strict=True) for t in s.context[past:]]
        positions = [n - 1 for _, n in step.decode] + [p for j in step.joins for p in range(j.past, j.length)]
        last = list(range(len(decoding))) + [j.start + j.length - j.past - 1 for j in step.joins]  # the tokens that predict
        self._step_prompt_tokens = sum(j.length - j.past for j in step.joins)
        device = self.model.device
        # The 4-D "mask" only makes transformers skip building one: rows_attention masks by `step`.
        out = self.model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                         attention_mask=self.no_mask, cache=cache, use_cache=True,
                         logits_to_keep=torch.tensor(last, device=device), step=step)
        return out.logits[0]

    def _reuse(self, seq: Sequence) -> tuple[torch.Tensor | int | None, int]:
        """Where a joining sequence's first columns come from: (the row of its request's leader, or a
        prefix cache entry's tensor, or None; how many columns)."""
        if seq.generated:  # a slid row restarts on new positions
            return None, 0
        leader = seq.leader
        if leader is not seq and leader in self.rows and leader.offset == seq.offset:
            seq.num_reused = len(seq.context) - 1  # the leader's row holds the whole prompt
            return self.rows.index(leader), seq.num_reused
        if self.prefix_cache.max_bytes == 0:
            return None, 0
        entry, past = self.prefix_cache.lookup(seq.context)
        seq.num_reused = past
        return (entry.kv, past) if entry else (None, 0)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        logits = logits.float()  # (rows, vocab)
        judged = [i for i, s in enumerate(seqs) if s.is_judged]
        raw = logits[judged].log_softmax(dim=-1) if judged else None  # the model's own likelihoods, for scoring
        apply_rules(self.rules_context, [s.rules for s in seqs], logits)
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        if any(s.params.unique for s in seqs) and self.rules_context.copy_index is not None:
            redraw_training_runs(self.rules_context, [s.rules for s in seqs], logits, tokens,
                                 lambda rows: sample_next(logits[rows], [seqs[i].params for i in rows], [seqs[i].generator for i in rows]).tolist())
        if judged:  # one gather and one copy to the host, not one per row (on a GPU each is a sync)
            picked = raw.gather(1, torch.tensor([[tokens[i]] for i in judged], device=raw.device)).squeeze(1).tolist()
            for i, logprob in zip(judged, picked, strict=True):
                seqs[i].logprob_sum += logprob
        return tokens

    @property
    def rules_context(self) -> RuleContext:
        if not hasattr(self, "_rules_context"):
            self._rules_context = RuleContext(self.token_bytes, self.eos, self._copy_index(), mask_utf8=self.mask_utf8)
        return self._rules_context

    def _new_rules(self, seq: Sequence) -> RowRules:
        """A row's rules start from the prompt the model sees (after a long one is trimmed)."""
        return RowRules(self.rules_context, seq.params, seq.prompt_ids[seq.start_offset :])

    def _commit(self, seqs: list[Sequence], tokens: list[int]) -> list[Event]:
        events, done = [], []
        for seq, token in zip(seqs, tokens, strict=True):
            if token == self.eos:
                seq.finish_reason = "stop"
            else:
                seq.generated.append(token)
                seq.rules.append(token)
                self._add_text(seq, token)
                if seq.finish_reason is None and len(seq.generated) >= seq.params.max_new_tokens:
                    seq.finish_reason = "length"
            if seq.finish_reason:
                done.append(seq)
            if seq.is_judged:
                continue  # its text goes out once judged, as one piece
            delta = self._take_delta(seq)
            if delta or seq.finish_reason:
                events.append(Event(seq, delta, seq.finish_reason is not None))
        for seq in done:
            if seq.is_judged and self._draw_again(seq):
                continue
            self._keep_for_reuse(seq)
            self._forget(seq)
            if seq.is_judged:
                events.extend(self._settle(seq))
        return events

    # -- judging ------------------------------------------------------------------------------

    def _draw_again(self, seq: Sequence) -> bool:
        """Record the finished draw; True if it holds a banned word or copies, and may be drawn again
        (sampled, with draws left): then its row is rewound to its prompt with a new seed."""
        seq.text = seq.text.rstrip("\ufffd")
        attempt = judging.judge(seq.text, seq.params, self.lm.tokenizer, self._copy_index(), prompt_ids=seq.prompt_ids[seq.offset :],
                                finish_reason=seq.finish_reason, num_tokens=len(seq.generated), seed=seq.seed,
                                mean_logprob=seq.logprob_sum / max(1, len(seq.generated)))
        seq.attempts.append(attempt)
        if not (attempt.banned or attempt.copies) or seq.params.temperature == 0 or len(seq.attempts) > judging.MAX_RESAMPLES:
            return False  # (a greedy row would draw the same again)
        seq.generated, seq.text, seq.num_emitted, seq.finish_reason = [], "", 0, None
        seq.logprob_sum, seq.rules = 0.0, self._new_rules(seq)
        seq.detok = self.token_bytes.detokenizer() if self.token_bytes else None
        seq.seed = (seq.seed + 0x9E3779B97F4A7C15) % 2**63  # a new seed, the same for the same request seed
        seq.generator.manual_seed(_fold_seed(seq.seed))
        if seq in self.rows and seq.offset == seq.start_offset:
            self.cache.lengths[self.rows.index(seq)] = len(seq.context) - 1  # its prompt stays; its last token is fed again
        else:  # it slid past the window: its prompt is no longer in its row
            if seq in self.rows:
                self._drop_rows([self.rows.index(seq)])
            seq.offset = seq.start_offset
            self.waiting.appendleft(seq)
        return True

    def _settle(self, seq: Sequence) -> list[Event]:
        """Once every candidate of the request is done, the request's one event: the best draw."""
        group = seq.group or [seq]
        seq.result = judging.Attempt("", "", 0, seq.seed, 0.0)  # a marker: this candidate is done
        if any(m.result is None for m in group):
            return []
        leader = group[0]
        chosen = judging.best([a for m in group for a in m.attempts])
        leader.result = chosen
        if chosen is None:
            tried = sum(len(m.attempts) for m in group)
            leader.finish_reason = "error"
            leader.error = f"each of {tried} draws held a banned word" if tried else leader.error or "no candidate finished"
            return [Event(leader, "", True)]
        leader.text, leader.finish_reason, leader.seed = chosen.text, chosen.finish_reason, chosen.seed
        return [Event(leader, chosen.text, True)]

    def _copy_index(self):
        if not hasattr(self, "_index"):
            from botkit.engine.copy_index import CopyIndex

            self._index = CopyIndex.load(self.lm.path) if getattr(self.lm, "path", None) else None
        return self._index

    def _step_failed(self, decoding: list[Sequence], joining: list[Sequence], states: list, exc: Exception) -> list[Event]:
        for seq, state in zip(decoding + joining, states, strict=True):
            seq.generator.set_state(state)
        if self.cache is not None:
            self.cache.step = None
        self.rows = [s for s in self.rows if s not in joining]  # the last rows; they never got valid keys and values
        suspects = decoding + joining
        name = type(exc).__name__  # no details (paths, tensors): users see the reason
        reason = f"out of memory, {name}" if isinstance(exc, torch.OutOfMemoryError | MemoryError) else name
        if len(suspects) == 1 and suspects[0].num_failed_alone:
            log.warning("A generation step failed again with one sequence alone (%s: %s); failing that request.", name, exc)
            seq = suspects[0]
            seq.finish_reason, seq.error = "error", reason
            self._forget(seq)
            if seq.is_judged:  # the request ends when all its candidates have
                seq.leader.error = seq.leader.error or reason
                return self._settle(seq)
            return [Event(seq, "", True)]
        if len(suspects) == 1:
            suspects[0].num_failed_alone += 1
            self.quarantine.appendleft(suspects)  # once more, alone: the fault may have been passing
        else:
            half = len(suspects) // 2
            self.quarantine.extendleft([suspects[half:], suspects[:half]])  # the first half runs next
        log.warning("A generation step failed (%s: %s); running its %d sequences in smaller groups to find the cause.",
                    name, exc, len(suspects))
        return []

    # -- text ---------------------------------------------------------------------------------

    def _add_text(self, seq: Sequence, token: int) -> None:
        """Grow the reply's text by the new token (or decode it whole for a tokenizer that is not byte
        level); a stop string ends it, wherever it falls across tokens."""
        before = len(seq.text)
        if seq.detok is not None:
            seq.text += seq.detok.add(token)
        else:
            seq.text = self.lm.tokenizer.decode(seq.generated)
        for stop in seq.params.stop:
            cut = seq.text.find(stop, max(0, min(before, len(seq.text)) - len(stop) + 1))
            if cut >= 0:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"

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

    # -- rows -----------------------------------------------------------------------------------

    def _ensure_cache(self, columns: int) -> SlotCache:
        if self.cache is None:
            device = self.model.device
            # On CPU a full-window buffer costs only the pages rows write; on a GPU memory is real: grow.
            capacity = self.window if device.type == "cpu" else min(self.window, columns + 128)
            self.cache = SlotCache(self.model.config, self.max_batch_size, capacity, self.model.dtype, device, zeroed=self.padded_decode)
        elif self.cache.capacity < columns:
            self.cache.grow(min(self.window, max(columns, 2 * self.cache.capacity)))
        return self.cache

    def drop_cached_prefixes(self, not_reusable_ids=()) -> None:
        """/forget: drop every kept conversation, and keep none of those in flight (they may quote the
        erased text), nor the requests `not_reusable_ids` still queued elsewhere when they arrive."""
        self.prefix_cache.clear()
        for seq in {*self.waiting, *self.rows, *itertools.chain(*self.quarantine)}:
            seq.is_reusable = False
        self._not_reusable_ids.update(not_reusable_ids)

    def _keep_for_reuse(self, seq: Sequence) -> None:
        """A finished row's keys and values, for a later prompt that extends it (the chat's next turn)."""
        if self.prefix_cache.max_bytes and seq.is_reusable and seq in self.rows:
            row = self.rows.index(seq)
            n = self.cache.lengths[row]
            self.prefix_cache.add(seq.context[:n], self.cache.read_row(row, n))

    def _forget(self, seq: Sequence) -> None:
        if seq in self.rows:
            self._drop_rows([self.rows.index(seq)])
        if seq in self.waiting:
            self.waiting.remove(seq)
        for group in self.quarantine:
            if seq in group:
                group.remove(seq)
        self.quarantine = deque(g for g in self.quarantine if g)

    def _drop_rows(self, rows: list[int]) -> None:
        """Free rows: each hole is filled by the current last row (one row copied)."""
        for r in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if r != last:
                self.cache.move_row(last, r)
                self.rows[r] = self.rows[last]
            self.rows.pop()
            self.cache.pop_row()


def _fold_seed(seed: int) -> int:
    """torch's CPU generator keeps only a seed's low 32 bits, so seeds 2^32 apart gave the same text:
    fold the high half in (seeds below 2^32 keep their streams)."""
    return seed if seed < 2**32 else (seed ^ (seed >> 32) * 0x9E3779B1) & 0xFFFFFFFF
