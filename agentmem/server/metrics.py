"""Prometheus metrics of one `agentmem serve` process (its own registry: two apps in one process,
as in the tests, count apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a prefill's few milliseconds to a long history's minutes on a CPU.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(
        self, depth: Callable[[], tuple[int, int]], memory_tokens: Callable[[], int]
    ) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "agentmem_requests", "HTTP requests answered", ["path", "status"], registry=r
        )
        self.tokens = Counter(
            "agentmem_tokens",
            "Tokens of chat completions: prompt (of which "
            "cached: served from memory, not prefilled) and completion",
            ["kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "agentmem_time_to_first_token_seconds",
            "From a chat completion's arrival to its first token",
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "agentmem_request_seconds",
            "A chat completion from arrival to its last token",
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "agentmem_decode_step_seconds",
            "One decoding step of a reply (retrieving its memory units and attending to them)",
            buckets=TIME_BUCKETS,
            registry=r,
        )
        queue = Gauge("agentmem_queue_depth", "Chat completions waiting for the model", registry=r)
        queue.set_function(lambda: depth()[0])
        active = Gauge("agentmem_active_replies", "Chat completions being decoded", registry=r)
        active.set_function(lambda: depth()[1])
        memory = Gauge(
            "agentmem_memory_tokens", "Tokens the sessions open in this process hold", registry=r
        )
        memory.set_function(memory_tokens)
