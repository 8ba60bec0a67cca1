"""Server metrics: engine counters read at scrape time, request latency histograms, a tokens/s meter.

Each server owns its own `CollectorRegistry` (never the process-global one), so several servers (tests,
benchmarks) can live in one process. The Prometheus endpoint is optional; `GetStats` reads the same
engine numbers and the same tokens/s meter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.types import EngineStats

PREFIX = "vla_mbpo"
# Unary calls take ~1 ms; an Imagine of thousands of branches takes seconds to minutes on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


class ThroughputMeter:
    """Rate of a monotonically growing counter over a sliding window of samples (thread-safe)."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def sample(self, total: int) -> float:
        """Records the counter's current value; returns the rate over the window (0 with < 2 samples)."""
        now = self._clock()
        with self._lock:
            self._samples.append((now, total))
            # Keep one sample at or before the window start so the rate spans the whole window.
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()
            (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(frozen=True)
class _Gauge:
    name: str
    help: str
    read: Callable[[EngineStats], float]


_ENGINE_GAUGES = (
    _Gauge("kv_blocks_capacity", "KV blocks in the pool", lambda s: s.kv_blocks_total),
    _Gauge("kv_blocks_used", "KV blocks referenced by a live state or running request", lambda s: s.kv_blocks_used),
    _Gauge("kv_blocks_cached", "free KV blocks that still hold a prefix-cache entry", lambda s: s.kv_blocks_cached),
    _Gauge("live_states", "states alive in the engine (created or kept, not released)", lambda s: s.live_states),
    _Gauge("queue_depth", "engine requests waiting to be scheduled", lambda s: s.queue_depth),
    _Gauge("prefix_cache_hit_rate", "prefix-cache hits / lookups since start", lambda s: s.prefix_cache_hit_rate),
)
_ENGINE_COUNTERS = (
    _Gauge("generated_tokens", "tokens sampled by the engine since start", lambda s: s.tokens_generated),
    _Gauge("branches_completed", "branches imagined since start", lambda s: s.branches_completed),
    _Gauge("prefix_cache_queries", "prefix-cache lookups over full blocks", lambda s: s.prefix_cache_queries),
    _Gauge("prefix_cache_hits", "prefix-cache hits over full blocks", lambda s: s.prefix_cache_hits),
)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time, so the endpoint and GetStats never disagree."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._metrics.engine_stats()
        for gauge in _ENGINE_GAUGES:
            yield GaugeMetricFamily(f"{PREFIX}_{gauge.name}", gauge.help, value=gauge.read(stats))
        for counter in _ENGINE_COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{counter.name}", counter.help, value=counter.read(stats))
        yield GaugeMetricFamily(f"{PREFIX}_tokens_per_second", "generated tokens per second over the recent window",
                                value=self._metrics.tokens_per_second(stats))


class ServerMetrics:
    """The server's metrics registry. `stats_fn` returns the engine's current EngineStats."""

    def __init__(self, stats_fn: Callable[[], EngineStats], window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stats_fn = stats_fn
        self._clock = clock
        self.meter = ThroughputMeter(window, clock)
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            f"{PREFIX}_request_latency_seconds", "RPC latency by method and status code (streams: until the end)",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_result_latency = Histogram(
            f"{PREFIX}_imagine_first_result_seconds", "Imagine: time from request to its first streamed result",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests_in_flight = Gauge(f"{PREFIX}_requests_in_flight", "RPCs being served", ["method"],
                                        registry=self.registry)
        self.branches_requested = Counter(f"{PREFIX}_branches_requested", "branches received in Imagine calls",
                                          registry=self.registry)
        self.states_expired = Counter(f"{PREFIX}_states_expired", "states released because their lease expired",
                                      registry=self.registry)
        self.server_live_states = Gauge(f"{PREFIX}_server_leases", "live states the server holds leases for",
                                        registry=self.registry)
        self.registry.register(_EngineCollector(self))
        self._http = None

    def engine_stats(self) -> EngineStats:
        return self._stats_fn()

    def tokens_per_second(self, stats: EngineStats | None = None) -> float:
        """Samples the engine's token counter and returns the rate over the meter's window."""
        return self.meter.sample((stats or self.engine_stats()).tokens_generated)

    @contextmanager
    def track(self, method: str) -> Iterator[_CallOutcome]:
        """Times one RPC; the body sets `outcome.code` when it fails (CANCELLED if it is cancelled)."""
        outcome = _CallOutcome()
        start = self._clock()
        self.requests_in_flight.labels(method).inc()
        try:
            yield outcome
        except BaseException as exc:  # cancellation arrives as CancelledError, a BaseException
            if outcome.code == grpc.StatusCode.OK:
                cancelled = isinstance(exc, asyncio.CancelledError)
                outcome.code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.requests_in_flight.labels(method).dec()
            self.request_latency.labels(method, outcome.code.name).observe(self._clock() - start)

    # ---- HTTP endpoint ----------------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int:
        """Starts the Prometheus endpoint on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@dataclass
class _CallOutcome:
    code: grpc.StatusCode = grpc.StatusCode.OK
