"""Whether the bot can serve: each enabled platform connected, the generation worker alive.

Adapters report their platform's connection (`expect` at start, then `up` / `down`); `GET /healthz`
and `GET /metrics` read it. Plain state, no SDK: the core owns one (`core.connections`).
"""

from __future__ import annotations


class Connections:
    def __init__(self):
        self._problems: dict[str, str | None] = {}  # platform -> why it is not connected, None when it is

    def expect(self, platform: str) -> None:
        """An enabled platform: unhealthy until it reports `up`."""
        self._problems.setdefault(platform, "not connected yet")

    def up(self, platform: str) -> None:
        self._problems[platform] = None

    def down(self, platform: str, reason: str) -> None:
        self._problems[platform] = reason

    def states(self) -> dict[str, bool]:
        """platform -> connected."""
        return {platform: problem is None for platform, problem in self._problems.items()}

    def problems(self) -> list[str]:
        return [f"{platform}: {problem}" for platform, problem in sorted(self._problems.items()) if problem is not None]


def problems(core) -> list[str]:
    """Everything that keeps the bot from serving now; empty when it is healthy."""
    worker = core.worker_problem()
    return ([f"worker: {worker}"] if worker else []) + core.connections.problems()


def details(core) -> dict:
    """What the engine says about itself for /healthz: a remote or vLLM server, and the settings it cannot honour."""
    details = getattr(core.backend, "health_details", None)
    return details() if details is not None else {"engine": "local"}
