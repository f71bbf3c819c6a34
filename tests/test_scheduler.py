"""The row scheduler on its own: who joins, who slides, who leaves, and how a failed step is narrowed
down. No model and no torch: sequences are plain token lists."""

import subprocess
import sys

from botkit.engine.scheduler import Scheduler
from botkit.engine.sequence import Sequence
from botkit.params import SamplingParams


def seq(n_prompt: int, seq_id: int = 0, **params) -> Sequence:
    return Sequence(seq_id, list(range(n_prompt)), SamplingParams(**params), generator=None, seed=0)


def decode_one(batch, token: int = 7) -> None:
    """What a good step does to its sequences: each takes one token."""
    for s in batch.seqs:
        s.generated.append(token)


def test_importing_the_scheduler_loads_no_torch():
    code = "import sys, botkit.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_waiting_sequences_join_within_free_rows_and_the_token_budget():
    scheduler = Scheduler(max_batch_size=3, window=64, max_join_tokens=10)
    a, b, c, d = seq(8, 0), seq(5, 1), seq(1, 2), seq(1, 3)
    scheduler.add([a, b, c, d])
    first = scheduler.schedule()
    assert first.joining == [a] and first.decoding == []  # b's 5 tokens would pass the budget of 10; a always fits
    decode_one(first)
    second = scheduler.schedule()
    assert second.decoding == [a] and second.decode_rows == [0] and second.joining == [b, c]  # 3 rows: d waits
    assert scheduler.rows == [a, b, c] and list(scheduler.waiting) == [d]


def test_a_candidate_joins_after_its_leader_and_the_others_do_not_wait_for_it():
    scheduler = Scheduler(max_batch_size=4, window=64)
    leader, other, plain = seq(4, 0, candidates=2, temperature=1.0), seq(4, 0, candidates=2, temperature=1.0), seq(3, 1)
    leader.group = other.group = [leader, other]
    scheduler.add([leader, other, plain])
    assert scheduler.schedule().joining == [leader, plain]
    assert scheduler.schedule().joining == [other]


def test_a_full_row_slides_to_its_last_half_window_and_the_last_row_fills_its_hole():
    scheduler = Scheduler(max_batch_size=3, window=8)
    full, short, last = seq(9, 0), seq(2, 1), seq(2, 2)  # `full` holds 8 columns: its next token would be the 9th
    scheduler.rows = [full, short, last]
    batch = scheduler.schedule()
    assert batch.freed_rows == [0] and batch.decoding == [short, last] and batch.decode_rows == [1, 0]
    assert batch.joining == [full] and full.offset == 9 - 4 and len(full.context) == 4
    assert scheduler.rows == [last, short, full]  # it rejoins as the newest row


def test_a_failed_step_is_halved_until_the_culprit_fails_alone_twice():
    scheduler = Scheduler(max_batch_size=4, window=64)
    seqs = [seq(2, i) for i in range(4)]
    scheduler.add(seqs)
    batch = scheduler.schedule()
    assert scheduler.failed(batch) is None and scheduler.rows == []  # the joining rows never got keys and values
    groups = []
    while (batch := scheduler.schedule()) is not None and len(groups) < 10:
        groups.append([s.id for s in batch.seqs])
        if seqs[3] not in batch.seqs:
            decode_one(batch)  # the good group rejoins the batch
            continue
        culprit = scheduler.failed(batch)
        if culprit is not None:
            scheduler.remove(culprit)
            break
    assert culprit is seqs[3]
    assert groups[:5] == [[0, 1], [2, 3], [2], [3], [3]]  # halves, then alone, then alone once more
    assert scheduler.rows == seqs[:3] and not scheduler.quarantine


def test_a_sequence_that_leaves_frees_its_row_and_is_gone_from_every_queue():
    scheduler = Scheduler(max_batch_size=3, window=64)
    a, b, c, queued = seq(2, 0), seq(2, 1), seq(2, 2), seq(2, 3)
    scheduler.rows = [a, b, c]
    scheduler.quarantine.append([queued])
    assert scheduler.remove(a) == 0 and scheduler.rows == [c, b]
    assert scheduler.remove(queued) is None and not scheduler.quarantine
    assert scheduler.remove(c) == 0 and scheduler.remove(b) == 0 and not scheduler.has_work
