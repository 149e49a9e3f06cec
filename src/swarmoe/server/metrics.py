"""Prometheus metrics: traffic and latency counted as it happens, engine state read at scrape.

Each app owns its registry, so several servers (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("swarmoe_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("swarmoe_requests_in_flight", "HTTP requests being served",
                               registry=r)
        self.latency = Histogram("swarmoe_request_latency_seconds",
                                 "Time from request to last byte, by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("swarmoe_time_to_first_token_seconds",
                              "Time from the engine taking a request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("swarmoe_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("swarmoe_generation_tokens", "Tokens generated",
                                         registry=r)
        self.running = Gauge("swarmoe_engine_requests_running", "Sequences in the running batch",
                             registry=r)
        self.waiting = Gauge("swarmoe_engine_requests_waiting", "Sequences queued for the engine",
                             registry=r)
        self.blocks_used = Gauge("swarmoe_cache_blocks_used", "Latent-cache blocks in use",
                                 registry=r)
        self.cache_usage = Gauge("swarmoe_cache_usage_ratio", "Fraction of cache blocks in use",
                                 registry=r)
        self.preemptions = Gauge("swarmoe_engine_preemptions", "Sequences preempted so far",
                                 registry=r)

    def render(self, stats: dict[str, float]) -> bytes:
        """The exposition text, with engine gauges set from `stats` (LLM.stats())."""
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.blocks_used.set(stats.get("blocks_used", 0))
        total = stats.get("blocks_total", 0)
        self.cache_usage.set(stats.get("blocks_used", 0) / total if total else 0)
        self.preemptions.set(stats.get("preemptions", 0))
        return generate_latest(self.registry)
