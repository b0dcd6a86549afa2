"""Prometheus metrics of one server: requests, batch sizes, tokens/s, queue, prefix and prompt caches, token gaps."""

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
        self.running = Gauge("fedprefix_running_requests", "Requests in the batch (decoding or prefilling)", registry=r)
        self.cache = Gauge("fedprefix_prefix_cache", "Decrypted-prefix cache", ["stat"], registry=r)
        self.prompts = Gauge(
            "fedprefix_prompt_cache",
            "Per-user prompt KV cache (tokens_saved: prompt tokens not prefilled)",
            ["stat"],
            registry=r,
        )
        self.kv = Gauge(
            "fedprefix_kv_cache",
            "The running batch's KV cache: bytes held now, and its budget (budget_bytes)",
            ["stat"],
            registry=r,
        )
        self.prefilled = Gauge("fedprefix_prefill_tokens", "Prompt tokens computed since start", registry=r)
        self.gaps = Histogram(
            "fedprefix_inter_token_seconds",
            "Seconds between two tokens of a running request (one decode step, with any prefill chunk fused in)",
            buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
            registry=r,
        )

    def render(self) -> bytes:
        stats = self.engine.stats
        while stats.batch_sizes:
            self.batch.observe(stats.batch_sizes.popleft())
        while stats.token_gaps:
            self.gaps.observe(stats.token_gaps.popleft())
        self.tokens.set(stats.tokens)
        self.prefilled.set(stats.prefill_tokens)
        self.rate.set(stats.tokens_per_second())
        self.queue.set(self.engine.queue_depth)
        self.running.set(self.engine.batch_size)
        self.kv.labels("bytes").set(self.engine.kv_bytes)
        self.kv.labels("budget_bytes").set(self.engine.kv_budget.bytes)
        if self.engine.prefixes is not None:
            cache = self.engine.prefixes.stats
            for stat in ("hits", "misses", "evictions", "bytes", "entries"):
                self.cache.labels(stat).set(getattr(cache, stat))
        if self.engine.prompts is not None:
            prompts = self.engine.prompts.stats
            for stat in ("hits", "misses", "tokens_saved", "bytes", "entries", "evictions"):
                self.prompts.labels(stat).set(getattr(prompts, stat))
        return generate_latest(self.registry)


Family = tuple[str, str, str, list[tuple[str, dict, float]]]  # name, help, type, samples


def families_of(registry: CollectorRegistry) -> list[Family]:
    """A registry's metrics as plain tuples (what a replica reports and the router merges)."""
    return [
        (m.name, m.documentation, m.type, [(s.name, s.labels, s.value) for s in m.samples]) for m in registry.collect()
    ]
