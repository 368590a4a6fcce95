"""Prometheus metrics, named under `lmstack:` after vLLM's `vllm:` set, in a registry of the
server's own (so several servers in one process do not collide).

The event loop updates them when a step's outputs arrive (`after_step`), from the engine's
counters sent with them and the outputs themselves; /metrics renders them.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmstack.infer import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(f"lmstack:{name}", doc, labelnames=list(labels), registry=r).labels(**labels)

        def counter(name, doc):
            return Counter(f"lmstack:{name}", doc, labelnames=list(labels), registry=r).labels(**labels)

        def histogram(name, doc):
            return Histogram(f"lmstack:{name}", doc, labelnames=list(labels), registry=r,
                             buckets=LATENCY_BUCKETS).labels(**labels)

        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a seat or KV blocks.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (KV blocks freed).")
        self.prefix_queries = counter("prefix_cache_queries", "Tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Tokens found in the prefix cache.")
        self.success = Counter("lmstack:request_success", "Finished requests by finish reason.",
                               labelnames=[*labels, "finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's outputs.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last token.")
        self.queue = histogram("request_queue_time_seconds", "Arrival to the first step that ran it.")
        self.labels = labels
        self._last_output: dict[str, float] = {}  # request id -> time of its last output
        self._seen = {"num_preemptions": 0, "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def after_step(self, stats: dict[str, float], outs: list[RequestOutput]) -> None:
        """The engine's gauges and counters (from its stats after the step), and each output's
        latencies."""
        self.engine_state(stats)
        for name, counter in (("num_preemptions", self.preemptions),
                              ("prefix_queried_tokens", self.prefix_queries),
                              ("prefix_hit_tokens", self.prefix_hits)):
            counter.inc(stats[name] - self._seen[name])
            self._seen[name] = stats[name]
        now = time.time()
        for out in outs:
            self._observe(out, now)

    def engine_state(self, stats: dict[str, float]) -> None:
        """Set the gauges from the engine's stats (also after aborts, which free blocks without
        a step)."""
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(1 - stats["free_blocks"] / stats["num_blocks"])

    def _observe(self, out: RequestOutput, now: float) -> None:
        self.generation_tokens.inc(len(out.delta_token_ids))
        m = out.metrics
        last = self._last_output.get(out.request_id)
        if last is None and m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        elif last is not None and out.delta_token_ids:
            self.itl.observe(now - last)
        self._last_output[out.request_id] = now
        if out.finished:
            self.finished(out)

    def finished(self, out: RequestOutput) -> None:
        self._last_output.pop(out.request_id, None)
        m = out.metrics
        self.success.labels(**self.labels, finished_reason=out.finish_reason).inc()
        if m.finish_time is not None:
            self.e2e.observe(m.finish_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
