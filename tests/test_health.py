"""GET /healthz and GET /metrics for people who run bots: a real core, the real adapters against the
fake servers, the web adapter on a free port, and Prometheus' own parser reading the scrape."""

from __future__ import annotations

import contextlib

import aiohttp
from botkit.adapters.web_adapter import WebAdapter
from platforms import GROUP, fake_server, platform, until
from prometheus_client.parser import text_string_to_metric_families
from scripted import ScriptedBackend

from botkit.config import Config, LimitsConfig, WebConfig

NO_LIMITS = Config(limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))


@contextlib.asynccontextmanager
async def web_for(core):
    async with WebAdapter(core, WebConfig(port=0)) as web, aiohttp.ClientSession(base_url=web.url) as http:
        yield http


async def health(http) -> tuple[int, dict]:
    async with http.get("/healthz") as response:
        return response.status, await response.json()


async def scrape(http) -> dict[str, list]:
    """metric name -> [(labels, value)], parsed as Prometheus would."""
    async with http.get("/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


async def test_healthz_follows_the_platform_connection_and_metrics_count_requests(tmp_path, monkeypatch):
    async with (
        fake_server("telegram", monkeypatch) as fake,
        platform("telegram", tmp_path, monkeypatch, ScriptedBackend(), NO_LIMITS, fake=fake) as bot,
        web_for(bot.core) as http,
    ):
        assert await health(http) == (
            200,
            {"status": "ok", "platforms": {"telegram": True}, "details": {"engine": "local"}},
        )
        answered = await bot.send(GROUP, "mention", "hello")
        await until(lambda: bot.answers(answered))
        await until(lambda: bot.core.stats().num_done == 1)
        metrics = await scrape(http)
        fake.fail_next("getUpdates", "drop", times=1000)  # Telegram unreachable: every poll fails
        await bot.send(GROUP, "plain", "ends the poll in flight")
        await until(lambda: bot.core.connections.states()["telegram"] is False)
        status, body = await health(http)
        down = await scrape(http)
        fake._faults["getupdates"].clear()
        await until(lambda: bot.core.connections.states()["telegram"], timeout_s=15)
        assert (await health(http))[0] == 200
    assert status == 503 and body["status"] == "unhealthy" and body["platforms"] == {"telegram": False}
    assert body["problems"] == ["telegram: cannot reach the Bot API (NetworkError); retrying"]
    assert ("botkit_requests_total", {"platform": "telegram", "status": "done"}, 1.0) in metrics["botkit_requests"]
    assert ("botkit_platform_connected", {"platform": "telegram"}, 1.0) in metrics["botkit_platform_connected"]
    assert ("botkit_platform_connected", {"platform": "telegram"}, 0.0) in down["botkit_platform_connected"]
    latency = {(name, labels.get("le")): value for name, labels, value in metrics["botkit_request_latency_seconds"]}
    assert (
        latency["botkit_request_latency_seconds_count", None] == 1.0
        and latency["botkit_request_latency_seconds_bucket", "+Inf"] == 1.0
    )
    assert latency["botkit_request_latency_seconds_bucket", "300.0"] == 1.0
    for gauge in ("botkit_queue_depth", "botkit_running", "botkit_tokens_per_second"):
        assert metrics[gauge][0][2] >= 0
    assert metrics["botkit_worker_alive"] == [("botkit_worker_alive", {}, 1.0)]


async def test_healthz_is_503_until_every_enabled_platform_connects_and_while_the_worker_is_dead(tmp_path, monkeypatch):
    backend = ScriptedBackend()
    async with platform("discord", tmp_path, monkeypatch, backend, NO_LIMITS) as bot, web_for(bot.core) as http:
        assert (await health(http))[0] == 200
        bot.core.connections.expect("telegram")  # enabled, not connected yet
        status, body = await health(http)
        assert status == 503 and body["problems"] == ["telegram: not connected yet"]
        bot.core.connections.up("telegram")
        backend.is_alive = lambda: False  # the generation thread died
        status, body = await health(http)
        metrics = await scrape(http)
    assert status == 503 and body["problems"] == ["worker: the generation worker has stopped"]
    assert metrics["botkit_worker_alive"] == [("botkit_worker_alive", {}, 0.0)]
