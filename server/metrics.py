"""Prometheus metrics, one registry per app (no module-level collectors)."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("omniloader_requests", "HTTP requests", ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("omniloader_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("omniloader_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("omniloader_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.token_latency = Histogram("omniloader_token_latency_seconds", "Time per generated token after the first",
                                       ["model"], buckets=(.002, .005, .01, .015, .02, .03, .05, .1, .25, 1),
                                       registry=r)
        self.queue_depth = Gauge("omniloader_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        self.active = Gauge("omniloader_active_requests", "Requests being served", ["model"], registry=r)
        self.resident = Gauge("omniloader_resident_models", "Models loaded", registry=r)
        self.memory = Gauge("omniloader_model_memory_bytes", "Memory a resident model is accounted for", ["model"],
                            registry=r)
        self.loads = Counter("omniloader_model_loads", "Model loads", ["model", "outcome"], registry=r)
        self.evictions = Counter("omniloader_model_evictions", "Models unloaded to make room or when idle",
                                 ["model", "reason"], registry=r)

    def generation(self, model: str, prompt_tokens: int, completion_tokens: int, ttft: float, total: float) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.ttft.labels(model).observe(ttft)
        if completion_tokens > 1:
            self.token_latency.labels(model).observe((total - ttft) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
