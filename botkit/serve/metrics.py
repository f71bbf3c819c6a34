"""Serving figures for /stats and the web page: queue, throughput, latency."""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    model: str
    queue_depth: int
    running: int
    tokens_per_s: float  # generated tokens per second over the last minute
    p50_ms: float  # latency from accepted to done, recent requests
    p99_ms: float
    num_done: int
    num_failed: int
    num_redrawn: int = 0  # replies drawn again (a banned word, or copying) before one was sent
    num_sent_copying: int = 0  # replies sent although they copy (every draw did; the least copying went)

    def summary(self) -> str:
        return (
            f"model {self.model} | queue {self.queue_depth} | generating {self.running} | "
            f"{self.tokens_per_s:.1f} tokens/s | latency p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms | "
            f"{self.num_done} done, {self.num_failed} failed | {self.num_redrawn} redrawn, {self.num_sent_copying} "
            "sent copying"
        )


# Upper bounds of the latency histogram's buckets (accepted to done), in seconds; Prometheus' `le`.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    WINDOW_S = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.latencies_ms: deque[float] = deque(maxlen=1000)
        self.tokens: deque[tuple[float, int]] = deque()
        self.num_done = 0
        self.num_failed = 0
        self.by_status: Counter[tuple[str, str]] = Counter()  # (platform, done | failed | cancelled) -> requests
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # per bucket, not cumulative; the last is +Inf
        self.latency_sum_s = 0.0
        self.num_redrawn = 0
        self.num_sent_copying = 0

    def done(self, latency_s: float, num_tokens: int, platform: str = "") -> None:
        self.num_done += 1
        self.by_status[platform, "done"] += 1
        self.latencies_ms.append(latency_s * 1000)
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.latency_sum_s += latency_s
        self.tokens.append((self.clock(), num_tokens))

    def judged(self, num_redraws: int, copies: bool) -> None:
        self.num_redrawn += num_redraws > 0
        self.num_sent_copying += copies

    def failed(self, platform: str = "", status: str = "failed") -> None:
        self.num_failed += 1
        self.by_status[platform, status] += 1

    def snapshot(self, model: str, queue_depth: int, running: int) -> Stats:
        now = self.clock()
        while self.tokens and self.tokens[0][0] < now - self.WINDOW_S:
            self.tokens.popleft()
        lat = sorted(self.latencies_ms)
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0  # noqa: E731
        return Stats(
            model,
            queue_depth,
            running,
            sum(n for _, n in self.tokens) / max(1.0, min(self.WINDOW_S, now - self.started)),
            pick(0.5),
            pick(0.99),
            self.num_done,
            self.num_failed,
            self.num_redrawn,
            self.num_sent_copying,
        )
