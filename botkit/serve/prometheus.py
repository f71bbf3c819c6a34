"""GET /metrics: botkit's figures in Prometheus' text format, read from the core at each scrape.

A collector on a registry of its own (nothing is registered in prometheus_client's global one),
built by the web adapter when first scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder

from botkit.serve.metrics import LATENCY_BUCKETS_S


class CoreCollector:
    def __init__(self, core):
        self.core = core

    def collect(self):
        stats, metrics = self.core.stats(), self.core.metrics
        yield GaugeMetricFamily(
            "botkit_queue_depth", "Requests waiting for a generation slot.", value=stats.queue_depth
        )
        yield GaugeMetricFamily("botkit_running", "Requests being generated now.", value=stats.running)
        yield GaugeMetricFamily(
            "botkit_tokens_per_second", "Tokens generated per second over the last minute.", value=stats.tokens_per_s
        )
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], metrics.latency_buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "botkit_request_latency_seconds",
            "Time from a request's acceptance to its reply.",
            buckets=buckets,
            sum_value=metrics.latency_sum_s,
        )
        requests = CounterMetricFamily(
            "botkit_requests", "Requests that ended, by platform and status.", labels=["platform", "status"]
        )
        for (platform, status), count in sorted(metrics.by_status.items()):
            requests.add_metric([platform, status], count)
        yield requests
        yield CounterMetricFamily(
            "botkit_replies_redrawn",
            "Replies drawn again for a banned word or copying before one was sent.",
            value=metrics.num_redrawn,
        )
        yield CounterMetricFamily(
            "botkit_replies_sent_copying",
            "Replies sent although every draw copied (the least copying).",
            value=metrics.num_sent_copying,
        )
        connected = GaugeMetricFamily(
            "botkit_platform_connected", "1 while the platform is connected, else 0.", labels=["platform"]
        )
        for platform, is_up in sorted(self.core.connections.states().items()):
            connected.add_metric([platform], float(is_up))
        yield connected
        yield GaugeMetricFamily(
            "botkit_worker_alive",
            "1 while requests can be generated, else 0.",
            value=float(self.core.worker_problem() is None),
        )
        server = getattr(self.core.backend, "server", None)  # an engine botkit runs itself (backend = "vllm")
        if server is not None:
            yield CounterMetricFamily(
                "botkit_engine_restarts",
                "Times botkit started the vLLM server again after it died.",
                value=max(0, server.num_starts - 1),
            )


def registry_for(core) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CoreCollector(core))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape's body and content type, in the format the scraper asked for (`Accept`)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
