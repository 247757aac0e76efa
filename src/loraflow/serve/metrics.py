"""Prometheus metrics of one server, in a registry of its own (no process-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests, tokens, batch size and queue length, exposed as GET /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loraflow_requests", "Finished HTTP requests to the API endpoints",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("loraflow_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("loraflow_generation_tokens", "Tokens generated", registry=r)
        self.batch_size = Gauge("loraflow_batch_size", "Requests in the running batch", registry=r)
        self.queue_length = Gauge("loraflow_queue_length", "Requests waiting for a batch row", registry=r)
        self.decode_batch_size = Histogram("loraflow_decode_batch_size", "Rows per decode step",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("loraflow_request_seconds", "Time from arrival to the last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)
