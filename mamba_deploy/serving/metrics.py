"""Prometheus metrics of the server (prometheus_client), one registry per server so several can live in a process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mamba_requests", "Completion requests by how they ended (stop, length, "
                                "cancelled, error)", ["finish_reason"], registry=r)
        self.http_errors = Counter("mamba_http_errors", "Requests refused with a 4xx/5xx status", ["status"],
                                   registry=r)
        self.prompt_tokens = Counter("mamba_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefill_tokens = Counter("mamba_prefill_tokens", "Prompt tokens actually prefilled (not from the "
                                      "prefix cache)", registry=r)
        self.generation_tokens = Counter("mamba_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("mamba_queue_depth", "Requests waiting for a state slot", registry=r)
        self.running = Gauge("mamba_running_sequences", "State slots in use", registry=r)
        self.batch_size = Histogram("mamba_decode_batch_size", "Sequences per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.prefix_hits = Counter("mamba_prefix_cache_hits", "Prompts that started from a cached prefix state",
                                   registry=r)
        self.prefix_misses = Counter("mamba_prefix_cache_misses", "Prompts with no cached prefix", registry=r)
        self.prefix_hit_tokens = Counter("mamba_prefix_cache_hit_tokens", "Prompt tokens skipped thanks to the "
                                         "prefix cache", registry=r)
        self.prefix_bytes = Gauge("mamba_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.prefix_entries = Gauge("mamba_prefix_cache_entries", "Snapshots in the prefix cache", registry=r)
        self.ttft = Histogram("mamba_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mamba_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
