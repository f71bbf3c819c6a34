"""What botkit keeps, and for how long: old rows erased on a schedule, the file compacted after.

With `[store] retention_days` set, every `prune_interval_s` the messages (and their requests,
replies and delivery records) received before that age are erased, their text overwritten on disk
(Store.prune); after erasing, at most every `vacuum_interval_s`, the file is rewritten without the
free pages (VACUUM). Markers of handled platform events are kept a day at most either way.

    async with Retention(store, config.store):
        ...
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time

from botkit.config import StoreConfig
from botkit.errors import StoreUnavailable
from botkit.serve.store import Store

log = logging.getLogger("botkit")

EVENT_MEMORY_S = 86400.0  # platforms redeliver an event within minutes; a day is plenty
DAY_S = 86400.0


class Retention:
    def __init__(self, store: Store, config: StoreConfig, clock=time.time):
        self.store, self.config, self.clock = store, config, clock
        self._task: asyncio.Task | None = None
        self._last_vacuum = -math.inf
        self._erased_since_vacuum = 0

    async def __aenter__(self) -> Retention:
        self._task = asyncio.create_task(self._run(), name="botkit-retention")
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def run_once(self) -> int:
        """Erase what is due now, VACUUM if erased rows wait and the interval has passed; returns rows erased."""
        now, days = self.clock(), self.config.retention_days
        await self.store.forget_events(now - min(EVENT_MEMORY_S, days * DAY_S if days else math.inf))
        erased = await self.store.prune(now - days * DAY_S) if days else 0
        self._erased_since_vacuum += erased
        if self._erased_since_vacuum and now - self._last_vacuum >= self.config.vacuum_interval_s:
            await self.store.vacuum()
            self._last_vacuum, self._erased_since_vacuum = now, 0
        if erased:
            log.info("Erased %d messages older than %g days ([store] retention_days)", erased, days)
        return erased

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except (sqlite3.Error, StoreUnavailable) as exc:  # a busy or full database: try again next time
                log.warning("Could not erase old rows (%s); trying again in %.0f s", exc, self.config.prune_interval_s)
            await asyncio.sleep(self.config.prune_interval_s)
