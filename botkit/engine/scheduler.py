"""Who runs in the next step: which waiting sequences join, which rows slide, who leaves. Torch-free
(nano-vllm's `Scheduler` shape): it knows rows and token counts, never tensors, and its tests load no model.

Row i of `rows` lives in the runner's slot `slots[i]` (runner.py). A row that leaves is replaced by
the last row; the runner applies the same rule to its slot list (`Runner.drop_row`), so both stay in step. A running
row holds the keys and values of its context but its last token, which the next step feeds.

A step that raises fails no one at first: `failed()` splits its sequences in two groups, each
scheduled alone in a later step, halving again until the one that fails alone (twice) is failed;
the others rejoin the batch after one good step.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from botkit.engine.sequence import Sequence

MAX_JOIN_TOKENS = 1024  # new prompt tokens that join in one step at most: the running rows wait for them, and
# matmuls of about this many rows run near this CPU's peak (of 4096 rows, at half of it)


@dataclass
class Batch:
    """One step: `decoding` rows take one token each; `joining` sequences are prefilled into new rows
    after the running ones (slid rows among them); `freed_rows`, in order, left the cache before it."""

    decoding: list[Sequence]
    decode_rows: list[int]
    joining: list[Sequence]
    freed_rows: list[int] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.decoding + self.joining  # the order of the step's logits


class Scheduler:
    def __init__(self, max_batch_size: int, window: int, max_join_tokens: int = MAX_JOIN_TOKENS):
        self.max_batch_size, self.window, self.max_join_tokens = max_batch_size, window, max_join_tokens
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []
        self.quarantine: deque[list[Sequence]] = deque()  # groups of a failed step, each to run alone
        self.failed_alone: set[Sequence] = set()  # failed once with nothing else in the step

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows or self.quarantine)

    def everyone(self) -> list[Sequence]:
        return [*self.rows, *self.waiting, *itertools.chain(*self.quarantine)]

    def add(self, seqs: list[Sequence], first: bool = False) -> None:
        if first:
            self.waiting.extendleft(reversed(seqs))
        else:
            self.waiting.extend(seqs)

    def schedule(self) -> Batch | None:
        """The next step (None: nothing to run). Joining sequences are rows from here on; a step that
        fails hands them back through `failed()`."""
        if self.quarantine:
            group = self.quarantine.popleft()
            decoding = [s for s in group if s in self.rows]
            joining = [s for s in group if s not in self.rows]
        else:
            decoding, joining = list(self.rows), self._take_joining()
        batch = self._slide_full_rows(decoding, joining)
        if not batch.decoding and not batch.joining:
            return None
        batch.decode_rows = [self.rows.index(s) for s in batch.decoding]
        self.rows.extend(batch.joining)
        return batch

    def _take_joining(self) -> list[Sequence]:
        """As many waiting sequences as free rows and the step's token budget allow (the first always fits)."""
        free = self.max_batch_size - len(self.rows)
        budget, joining = self.max_join_tokens, []
        for seq in list(self.waiting):
            if len(joining) >= free or (joining and len(seq.context) > budget):
                break
            if seq.leader is not seq and not seq.generated and seq.leader in joining:
                continue  # a candidate joins after its leader's prompt is in, and copies its keys and values
            self.waiting.remove(seq)
            budget -= len(seq.context)
            joining.append(seq)
        return joining

    def _slide_full_rows(self, decoding: list[Sequence], joining: list[Sequence]) -> Batch:
        """A row whose next token would fall outside the window restarts on its last half-window (its
        prefill yields its next token: nothing is skipped)."""
        full = [s for s in decoding if len(s.context) - 1 >= self.window]
        freed = []
        for seq in full:
            seq.offset = len(seq.prompt_ids) + len(seq.generated) - self.window // 2
            freed.append(self.drop_row(seq))
        return Batch([s for s in decoding if s not in full], [], joining + full, freed)

    def drop_row(self, seq: Sequence) -> int:
        """Free `seq`'s row (the last row moves into it); returns the row freed."""
        row, last = self.rows.index(seq), len(self.rows) - 1
        self.rows[row] = self.rows[last]
        self.rows.pop()
        return row

    def remove(self, seq: Sequence) -> int | None:
        """`seq` leaves (finished, cancelled or failed); returns the row it freed, if it had one."""
        row = self.drop_row(seq) if seq in self.rows else None
        if seq in self.waiting:
            self.waiting.remove(seq)
        for group in self.quarantine:
            if seq in group:
                group.remove(seq)
        self.quarantine = deque(g for g in self.quarantine if g)
        self.failed_alone.discard(seq)
        return row

    def failed(self, batch: Batch) -> Sequence | None:
        """A step raised: its joining rows are gone (they never got keys and values); returns the
        sequence to fail (it failed alone twice), else queues the step's sequences in halves."""
        self.rows = [s for s in self.rows if s not in batch.joining]  # the last rows
        suspects = batch.seqs
        if len(suspects) == 1 and suspects[0] in self.failed_alone:
            return suspects[0]
        if len(suspects) == 1:
            self.failed_alone.add(suspects[0])
            self.quarantine.appendleft(suspects)  # once more, alone: the fault may have been passing
        else:
            half = len(suspects) // 2
            self.quarantine.extendleft([suspects[half:], suspects[:half]])  # the first half runs next
        return None

    def reset(self) -> list[Sequence]:
        """Forget every sequence (at shutdown); returns them."""
        lost = self.everyone()
        self.rows, self.waiting, self.quarantine, self.failed_alone = [], deque(), deque(), set()
        return lost
