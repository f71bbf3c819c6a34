"""The generation engine: continuous batching over GPT-2's KV cache, in nano-vllm's shape.

Why our own loop rather than transformers' `ContinuousBatchingManager`: that manager has no
per-request stop strings or seeds, and on this 2-core CPU it reached 2.2x sequential `generate` on
the shared workload (FACTS.md); through botkit's core this loop reaches 5.5-6.1x at 64 chats
(`benchmarks/serve.py`, BENCHMARKS.md).

A step is: the scheduler picks who runs (scheduler.py: who joins, who slides, who leaves; no
torch), the runner runs the model once over every row's new tokens (runner.py, kvcache.py,
prefix_cache.py), the sampler draws each row's token under its rules (`_sample`), and the
post-processor grows the text, applies stop strings and lengths (postprocess.py). A row that
finishes leaves at once; a judged one (banned words, `unique`, `candidates`) is first handed to the
judge (judging.Judge), which may have it drawn again in its own row (the prompt's keys and values
stay; only its length is rewound) and hands out the request's text once, when every candidate is done.

A `unique` row never draws a token that would make its last 8 tokens a run of its model's training
text (copy_index.py's index; the token is masked and the row draws again), so its reply shares no
8-token span with the training text by construction.

A step that raises fails no one at first: the scheduler narrows the fault down to its sequence
(Scheduler.failed). The caller's thread goes on reading its inbox between steps, so cancellations,
timeouts and new requests are never held up by a retry. Not thread-safe: one thread owns it.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

from botkit.engine.judging import Judge
from botkit.engine.postprocess import Postprocessor
from botkit.engine.rules import MIN_TEMPERATURE, RowRules, RuleContext, apply_rules, redraw_training_runs
from botkit.engine.runner import Prefill, Runner
from botkit.engine.sampling import sample_next
from botkit.engine.scheduler import Batch, Scheduler
from botkit.engine.sequence import Event, Sequence
from botkit.engine.token_bytes import TokenBytes
from botkit.model.loading import LoadedModel
from botkit.model.prepack import can_prepack
from botkit.model.prepack import prepack as prepack_weights
from botkit.params import SamplingParams

__all__ = ["Engine", "Event", "Sequence"]

log = logging.getLogger("botkit")


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
    def __init__(
        self,
        lm: LoadedModel,
        max_batch_size: int = 32,
        *,
        cache_mb: int | None = None,
        before_step: Callable[[list[Sequence]], None] | None = None,
        padded_decode: bool | None = None,
        mask_utf8: bool = True,
        prepack: bool = False,
    ):
        """`cache_mb`: memory for conversation reuse (None: default_cache_mb; 0: off). `before_step`
        is called with a step's sequences before its forward pass (fault injection in tests).
        `padded_decode`: decode attention as one padded call per layer (default: on a GPU only).
        `mask_utf8=False` lets a row sample bytes that are not UTF-8 (only to measure what the mask prevents).
        `prepack`: on CPU in float32, run a copy of the model whose matmul weights are in oneDNN's layout
        (model/prepack.py; serving turns it on: decode steps ~1.3x faster for GPT-2 124M, ~490 MB more)."""
        self.lm = lm
        device = lm.model.device
        self.window = lm.max_context
        self.eos = lm.eos_token_id
        self.token_bytes = TokenBytes.of(lm.tokenizer)
        if self.token_bytes is not None:
            self.token_bytes.build()
        self.mask_utf8 = mask_utf8 and self.token_bytes is not None
        self.before_step = before_step
        self.scheduler = Scheduler(max_batch_size, self.window)
        self.runner = Runner(
            prepack_weights(lm.model) if prepack and can_prepack(lm.model) else lm.model,
            self.window,
            max_batch_size,
            padded_decode=device.type == "cuda" if padded_decode is None else padded_decode,
            cache_bytes=(default_cache_mb(device) if cache_mb is None else cache_mb) * 2**20,
        )
        self.post = Postprocessor(self.eos, self.token_bytes, lm.tokenizer)
        self.judge = Judge(lm.tokenizer, self._copy_index)
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
        self.scheduler.add(seqs)
        return seqs[0]

    def _new_sequence(self, request_id: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> Sequence:
        seq = Sequence(
            request_id, list(prompt_ids) or [self.eos], params, torch.Generator(), seed, detok=self.post.detokenizer()
        )
        seq.generator.manual_seed(_fold_seed(seed))
        max_prompt = self.window - min(params.max_new_tokens, self.window // 2)
        if len(seq.prompt_ids) > max_prompt:
            log.warning(
                "A prompt of %d tokens is longer than the window allows; keeping its last %d.",
                len(seq.prompt_ids),
                max_prompt,
            )
            seq.offset = seq.start_offset = len(seq.prompt_ids) - max_prompt
        seq.rules = self._new_rules(seq)
        return seq

    @torch.inference_mode()  # the cache's tensors are inference tensors: moving a row needs the mode
    def cancel(self, seq_id: int) -> Sequence | None:
        """Stop the request `seq_id` (all its candidates); returns its leading sequence."""
        found = [s for s in self.scheduler.everyone() if s.id == seq_id]
        for seq in found:
            seq.finish_reason = "cancelled"
            self._forget(seq, keep=seq.is_reusable)  # its conversation so far, for the chat's next turn
        return found[0].leader if found else None

    def drop_cached_prefixes(self, not_reusable_ids=()) -> None:
        """/forget: drop every kept conversation, and keep none of those in flight (they may quote the
        erased text), nor the requests `not_reusable_ids` still queued elsewhere when they arrive."""
        self.runner.drop_cached_prefixes()
        for seq in self.scheduler.everyone():
            seq.is_reusable = False
        self._not_reusable_ids.update(not_reusable_ids)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward pass of one token outside any step (nothing cached or counted), so that the first
        reply does not pay for the first calls into oneDNN, OpenMP and the allocator."""
        self.runner.model(input_ids=torch.tensor([[self.eos]], device=self.runner.model.device))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def reset(self) -> list[Sequence]:
        """Forget every sequence (at shutdown); returns them."""
        self.runner.reset()
        return self.scheduler.reset()

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Schedule, run the model once, sample, post-process; rows that finish leave (judged ones through the
        judge)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        for row in batch.freed_rows:  # rows that slid: they rejoin on their last half-window
            self.runner.drop_row(row)
        # a failed step must not move a random stream (greedy rows draw nothing: no state to keep)
        states = [(s, s.generator.get_state()) for s in batch.seqs if s.params.temperature >= MIN_TEMPERATURE]
        try:
            if self.before_step:
                self.before_step(batch.seqs)
            logits = self.runner.run(
                [(r, s.last_token) for r, s in zip(batch.decode_rows, batch.decoding, strict=True)],
                [self._prefill(s) for s in batch.joining],
            )
            tokens = self._sample(batch.seqs, logits)
        except Exception as exc:  # noqa: BLE001 - keep serving; narrow the fault down to its sequence
            return self._step_failed(batch, states, exc)
        self.runner.end()
        events, done = self.post.process(batch.seqs, tokens)
        return events + [event for seq in done for event in self._finish(seq)]

    # compatibility and statistics: what tests, benchmarks and the serving core read
    rows = property(lambda self: self.scheduler.rows)
    waiting = property(lambda self: self.scheduler.waiting)
    prefix_cache = property(lambda self: self.runner.prefix_cache)
    num_forward_passes = property(lambda self: self.runner.num_forward_passes)
    num_prompt_tokens_computed = property(lambda self: self.runner.num_prompt_tokens_computed)

    # -- a step -------------------------------------------------------------------------------

    def _prefill(self, seq: Sequence) -> Prefill:
        """A joining row, starting from its request leader's row or a prefix cache entry when it can."""
        if seq.generated:  # a slid row restarts on new positions
            return Prefill(seq.context)
        leader, rows = seq.leader, self.scheduler.rows[: len(self.runner.slots)]  # rows that ran before this step
        if leader is not seq and leader in rows and leader.offset == seq.offset:
            seq.num_reused = len(seq.context) - 1  # the leader's row holds the whole prompt
            return Prefill(seq.context, seq.num_reused, rows.index(leader))
        entry, seq.num_reused = self.runner.lookup(seq.context)
        return Prefill(seq.context, seq.num_reused, entry)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        logits = logits.float()  # (rows, vocab)
        judged = [i for i, s in enumerate(seqs) if s.is_judged]
        raw = logits[judged].log_softmax(dim=-1) if judged else None  # the model's own likelihoods, for scoring
        apply_rules(self.rules_context, [s.rules for s in seqs], logits)
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        if any(s.params.unique for s in seqs) and self.rules_context.copy_index is not None:
            redraw_training_runs(
                self.rules_context,
                [s.rules for s in seqs],
                logits,
                tokens,
                lambda rows: sample_next(
                    logits[rows], [seqs[i].params for i in rows], [seqs[i].generator for i in rows]
                ).tolist(),
            )
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

    def _finish(self, seq: Sequence) -> list[Event]:
        """A finished row leaves: drawn again if the judge says so, else kept for reuse and freed."""
        if seq.is_judged and self.judge.redraws(seq):
            self._redraw(seq)
            return [Event(seq, "", False, draft="")] if seq.params.candidates == 1 else []  # the preview starts over
        self._forget(seq, keep=seq.is_reusable)
        return self.judge.settle(seq) if seq.is_judged else []

    def _redraw(self, seq: Sequence) -> None:
        """Rewind the row to its prompt with a new seed (the same for the same request seed)."""
        row = self.scheduler.rows.index(seq) if seq in self.scheduler.rows else None
        slid = seq.offset != seq.start_offset
        seq.restart((seq.seed + 0x9E3779B97F4A7C15) % 2**63, self.post.detokenizer())
        seq.rules = self._new_rules(seq)
        seq.generator.manual_seed(_fold_seed(seq.seed))
        if row is not None and not slid:
            self.runner.rewind_row(row, len(seq.context) - 1)  # its prompt stays; its last token is fed again
            return
        if row is not None:  # it slid past the window: its prompt is no longer in its row
            self.runner.drop_row(self.scheduler.drop_row(seq))
        self.scheduler.add([seq], first=True)

    def _copy_index(self):
        if not hasattr(self, "_index"):
            from botkit.engine.copy_index import CopyIndex

            self._index = CopyIndex.load(self.lm.path) if getattr(self.lm, "path", None) else None
        return self._index

    def _step_failed(self, batch: Batch, states: list, exc: Exception) -> list[Event]:
        for seq, state in states:
            seq.generator.set_state(state)
        self.runner.abort()
        name = type(exc).__name__  # no details (paths, tensors): users see the reason
        culprit = self.scheduler.failed(batch)
        if culprit is None:
            log.warning(
                "A generation step failed (%s: %s); running its %d sequences in smaller groups to find the cause.",
                name,
                exc,
                len(batch.seqs),
            )
            return []
        log.warning("A generation step failed again with one sequence alone (%s: %s); failing that request.", name, exc)
        culprit.finish_reason = "error"
        culprit.error = f"out of memory, {name}" if isinstance(exc, torch.OutOfMemoryError | MemoryError) else name
        self._forget(culprit)
        if culprit.is_judged:  # the request ends when all its candidates have
            culprit.leader.error = culprit.leader.error or culprit.error
            return self.judge.settle(culprit)
        return [Event(culprit, "", True)]

    def _forget(self, seq: Sequence, keep: bool = False) -> None:
        """`seq` leaves; with `keep`, its row's keys and values stay in the prefix cache (no copy)."""
        row = self.scheduler.remove(seq)
        if row is not None:
            self.runner.drop_row(row, seq.context if keep else None, max(0, len(seq.prompt_ids) - seq.offset))


def _fold_seed(seed: int) -> int:
    """torch's CPU generator keeps only a seed's low 32 bits, so seeds 2^32 apart gave the same text:
    fold the high half in (seeds below 2^32 keep their streams)."""
    return seed if seed < 2**32 else (seed ^ (seed >> 32) * 0x9E3779B1) & 0xFFFFFFFF
