"""runtime.metrics: the tokens/s meter, engine numbers at scrape time, latency histograms, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from engine.types import EngineStats
from runtime.metrics import ServerMetrics, ThroughputMeter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_meter_rate_over_window():
    clock = FakeClock()
    meter = ThroughputMeter(window=10.0, clock=clock)
    assert meter.sample(0) == 0.0  # one sample: no rate yet
    clock.now = 2.0
    assert meter.sample(100) == 50.0
    clock.now = 12.0
    assert meter.sample(600) == 50.0  # window [2, 12]: (600 - 100) / 10, the t=0 sample dropped
    clock.now = 20.0
    assert meter.sample(600) == pytest.approx(500 / 18)  # sample at t=2 opens the window [10, 20]
    clock.now = 30.0
    assert meter.sample(600) == 0.0  # window [20, 30] saw no new tokens


def sample_value(metrics: ServerMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_engine_numbers_are_read_at_scrape_time():
    stats = EngineStats(kv_blocks_total=64, kv_blocks_used=12, kv_blocks_cached=4, live_states=3, queue_depth=1,
                        tokens_generated=500, prefix_cache_queries=10, prefix_cache_hits=7, branches_completed=9)
    clock = FakeClock()
    metrics = ServerMetrics(lambda: stats, clock=clock)
    assert sample_value(metrics, "vla_mbpo_kv_blocks_capacity") == 64
    assert sample_value(metrics, "vla_mbpo_kv_blocks_used") == 12
    assert sample_value(metrics, "vla_mbpo_kv_blocks_cached") == 4
    assert sample_value(metrics, "vla_mbpo_live_states") == 3
    assert sample_value(metrics, "vla_mbpo_queue_depth") == 1
    assert sample_value(metrics, "vla_mbpo_generated_tokens_total") == 500
    assert sample_value(metrics, "vla_mbpo_branches_completed_total") == 9
    assert sample_value(metrics, "vla_mbpo_prefix_cache_hit_rate") == 0.7
    stats.kv_blocks_used, stats.tokens_generated = 20, 900
    clock.now = 4.0
    assert sample_value(metrics, "vla_mbpo_kv_blocks_used") == 20
    # Every scrape above sampled the meter (first at t=0 with 500 tokens): (900 - 500) / 4 s.
    assert sample_value(metrics, "vla_mbpo_tokens_per_second") == 100.0


def test_track_records_latency_by_method_and_code():
    clock = FakeClock()
    metrics = ServerMetrics(EngineStats, clock=clock)
    with metrics.track("GetStats"):
        assert sample_value(metrics, "vla_mbpo_requests_in_flight", {"method": "GetStats"}) == 1
        clock.now += 0.003
    with pytest.raises(ValueError), metrics.track("CreateStates") as outcome:
        outcome.code = grpc.StatusCode.INVALID_ARGUMENT
        raise ValueError("bad")
    with pytest.raises(asyncio.CancelledError), metrics.track("Imagine"):
        raise asyncio.CancelledError
    count = "vla_mbpo_request_latency_seconds_count"
    assert sample_value(metrics, count, {"method": "GetStats", "code": "OK"}) == 1
    assert sample_value(metrics, "vla_mbpo_request_latency_seconds_bucket",
                        {"method": "GetStats", "code": "OK", "le": "0.0025"}) == 0
    assert sample_value(metrics, "vla_mbpo_request_latency_seconds_bucket",
                        {"method": "GetStats", "code": "OK", "le": "0.005"}) == 1
    assert sample_value(metrics, count, {"method": "CreateStates", "code": "INVALID_ARGUMENT"}) == 1
    assert sample_value(metrics, count, {"method": "Imagine", "code": "CANCELLED"}) == 1
    assert sample_value(metrics, "vla_mbpo_requests_in_flight", {"method": "GetStats"}) == 0


def test_http_endpoint_serves_the_registry():
    metrics = ServerMetrics(lambda: EngineStats(kv_blocks_total=8, live_states=2))
    port = metrics.serve_http("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.stop_http()
    assert "vla_mbpo_kv_blocks_capacity 8.0" in body and "vla_mbpo_live_states 2.0" in body
    assert "# TYPE vla_mbpo_request_latency_seconds histogram" in body
