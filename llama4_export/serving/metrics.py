"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide): queue depth,
running sequences, generated tokens and tokens/s, prompt tokens admitted and reused, time to first token and per-token
latency histograms, requests by endpoint and status; and one exposition of several replicas' registries (llama4-serve
--ray), each sample labelled with its replica."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from ..runtime.batching import BatchEngine

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds
# Buckets: 5 ms .. 60 s for the first token (queueing + prefill), 1 ms .. 5 s between tokens (one decode step).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5)


class TokenRate:
    """Tokens per second over the last RATE_WINDOW_S seconds."""

    def __init__(self):
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self, now: float) -> None:
        with self._lock:
            self._times.append(now)
            self._drop_before(now - RATE_WINDOW_S)  # not only at a scrape: unscraped, every token's time was kept

    def value(self) -> float:
        with self._lock:
            self._drop_before(time.monotonic() - RATE_WINDOW_S)
            return len(self._times) / RATE_WINDOW_S

    def _drop_before(self, cutoff: float) -> None:
        while self._times and self._times[0] < cutoff:
            self._times.popleft()


class _ReusedPromptTokens:
    """The engine's own count of prompt tokens taken over from rows instead of prefilled, read at each scrape."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("llama4_prompt_tokens_reused", "Prompt tokens taken over from a row's previous "
                                  "sequence instead of prefilled", value=self.engine.reused_prompt_tokens)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: BatchEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("llama4_queue_depth", "Requests waiting for a row", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("llama4_running_sequences", "Sequences holding a row (prefilling or decoding)",
              registry=r).set_function(lambda: engine.running)
        Gauge("llama4_max_batch", "Rows of the KV cache (sequences decoded at once)", registry=r).set(engine.max_batch)
        self.rate = TokenRate()
        Gauge("llama4_generation_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.rate.value)
        self.tokens = Counter("llama4_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("llama4_prompt_tokens", "Prompt tokens of admitted requests, as their usage "
                                     "counts them (once, whatever n)", registry=r)
        self.ttft = Histogram("llama4_time_to_first_token_seconds", "From request arrival to its first token, the "
                              "tokenizing of its prompts and encoding of its images included",
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("llama4_time_per_output_token_seconds", "Between consecutive tokens of a request",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter("llama4_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        r.register(_ReusedPromptTokens(engine))

    def token(self, arrival: float, previous: float | None) -> float:
        """Record one generated token of a request that arrived at `arrival` (its previous token at `previous`)."""
        now = time.monotonic()
        self.tokens.inc()
        self.rate.add(now)
        if previous is None:
            self.ttft.observe(now - arrival)
        else:
            self.token_latency.observe(now - previous)
        return now

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def replicas_exposition(replicas: Iterable[tuple[str, list[Metric]]]) -> bytes:
    """One text exposition of several replicas' families (each as its registry's collect() gave them), every sample
    labelled `replica`: a family's samples stay one group, as the format requires, one replica's after another's."""
    merged: dict[str, Metric] = {}
    for replica, families in replicas:
        for family in families:
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    return generate_latest(_Families(merged.values()))


class _Families:
    """Families as a registry: generate_latest reads any object's collect()."""

    def __init__(self, families: Iterable[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families
