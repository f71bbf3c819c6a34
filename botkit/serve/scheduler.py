"""Who runs next: a bounded queue that serves users in turn, and sliding-window rate limits.

Pure policy, no asyncio and no torch, so it is tested on its own. One user flooding the bot gets one
turn per round like everyone else, instead of first-come-first-served.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from botkit.errors import RateLimitedError

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Round-robin over users; each user's own items stay in order."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._users: OrderedDict[Hashable, deque[T]] = OrderedDict()  # rotation order: first is served next
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self):
        return (item for items in self._users.values() for item in items)

    def push(self, user: Hashable, item: T) -> None:
        self._users.setdefault(user, deque()).append(item)
        self._size += 1

    def pop(self) -> T:
        user, items = next(iter(self._users.items()))
        item = items.popleft()
        self._size -= 1
        del self._users[user]
        if items:
            self._users[user] = items  # to the back of the rotation
        return item

    def remove(self, user: Hashable, item: T) -> bool:
        items = self._users.get(user)
        if items is None or item not in items:
            return False
        items.remove(item)
        self._size -= 1
        if not items:
            del self._users[user]
        return True

    def ahead_of(self, user: Hashable, item: T) -> int:
        """How many queued items will be served before `item` (None-safe: -1 if not queued)."""
        items = self._users.get(user)
        if items is None or item not in items:
            return -1
        turn = items.index(item)  # served in round `turn`
        ahead, before_user = 0, True
        for other, other_items in self._users.items():
            if other == user:
                before_user = False
                ahead += turn
            else:
                ahead += min(len(other_items), turn + 1 if before_user else turn)
        return ahead


class RateLimiter:
    """At most `limit` events per `window_s` for each key (0 = no limit)."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._events: dict[Hashable, deque[float]] = {}

    def check(self, key: Hashable, who: str) -> None:
        """Count an event of `key`, or refuse it: RateLimitedError, whose sentence starts with `who`."""
        wait = self.retry_after(key)
        if wait:
            raise RateLimitedError(f"{who} sending requests too fast; try again in {max(1, round(wait))} s.")

    def retry_after(self, key: Hashable) -> float:
        """Seconds until `key` may act again; 0 means now (and the event is counted)."""
        if not self.limit:
            return 0.0
        now = self.clock()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        if len(events) >= self.limit:
            return events[0] + self.window_s - now
        events.append(now)
        if len(self._events) > 10_000:  # forget idle keys so memory stays bounded
            for k in [k for k, v in self._events.items() if not v or v[-1] <= now - self.window_s]:
                del self._events[k]
        return 0.0
