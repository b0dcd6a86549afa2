"""Prometheus metrics of one server: requests, batch sizes, tokens/s, queue, prefix cache."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import Engine


class Metrics:
    """Prometheus metrics of one server (its own registry, so tests can run several)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fedprefix_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.batch = Histogram(
            "fedprefix_batch_size", "Rows per decode step", buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=r
        )
        self.tokens = Gauge("fedprefix_generated_tokens", "Tokens generated since start", registry=r)
        self.rate = Gauge("fedprefix_tokens_per_second", "Generated tokens per second, last 10 s", registry=r)
        self.queue = Gauge("fedprefix_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("fedprefix_running_requests", "Requests in the running batch", registry=r)
        self.cache = Gauge("fedprefix_prefix_cache", "Decrypted-prefix cache", ["stat"], registry=r)

    def render(self) -> bytes:
        stats = self.engine.stats
        while stats.batch_sizes:
            self.batch.observe(stats.batch_sizes.popleft())
        self.tokens.set(stats.tokens)
        self.rate.set(stats.tokens_per_second())
        self.queue.set(self.engine.queue_depth)
        self.running.set(self.engine.batch_size)
        if self.engine.prefixes is not None:
            cache = self.engine.prefixes.stats
            for stat in ("hits", "misses", "evictions", "bytes", "entries"):
                self.cache.labels(stat).set(getattr(cache, stat))
        return generate_latest(self.registry)
