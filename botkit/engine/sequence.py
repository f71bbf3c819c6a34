"""One sample being generated, and the event a step hands out for it. Torch-free: the scheduler and
its tests use it with no model loaded (`generator` is a torch.Generator in the engine, anything in tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from botkit.params import SamplingParams


@dataclass(eq=False)  # one sequence is equal to itself only (`seq in rows` must not compare token lists)
class Sequence:
    """`text` is the generated text so far (prompt excluded). While it runs, its row holds the keys
    and values of `context` but its last token (which the next step feeds)."""

    id: int  # the request's: the candidates of one request share it
    prompt_ids: list[int]
    params: SamplingParams
    generator: Any  # its own random stream (torch.Generator)
    seed: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    num_emitted: int = 0  # characters of text already handed out as deltas
    detok: Any = None  # token_bytes.Detokenizer: the text grows by each token's bytes (None: decode whole)
    offset: int = 0  # tokens dropped from the front of prompt_ids + generated (window slides)
    start_offset: int = 0  # the offset it started with (a prompt longer than the window), restored by a redraw
    finish_reason: str | None = None  # "stop" (stop string or end of text) | "length" | "cancelled" | "error"
    error: str = ""  # why it failed, when finish_reason is "error"
    num_reused: int = 0  # prompt tokens whose keys and values were reused (prefix cache or its leader's row)
    rules: Any = None  # rules.RowRules: its per-token rules' state, advanced as tokens are appended
    group: list[Sequence] | None = None  # the candidates of its request, leader first
    attempts: list = field(default_factory=list)  # judging.Attempt of each judged draw so far
    result: Any = None  # judging.Attempt: what the request sends, once judged
    logprob_sum: float = 0.0  # of its generated tokens under the model, while judged (nats)
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

    def restart(self, seed: int, detok: Any) -> None:
        """Forget the reply for a new draw from the same prompt (the caller reseeds `generator` and renews `rules`)."""
        self.generated, self.text, self.num_emitted, self.detok, self.finish_reason = [], "", 0, detok, None
        self.logprob_sum = 0.0
        self.seed, self.offset = seed, self.start_offset


@dataclass
class Event:
    seq: Sequence
    delta: str  # new text since the last event
    finished: bool
