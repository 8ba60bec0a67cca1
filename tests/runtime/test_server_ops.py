"""Operating the real server: health, reflection, auth, TLS, metrics, lease expiry, cancellation, CLI."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from engine.config import EngineConfig
from engine.engine import Engine
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from runtime import server as server_module
from runtime.config import ServerConfig
from runtime.server import RolloutServer
from tests.runtime.conftest import action_chunks, observations, stub
from trainer.rollout_client import RolloutServerError, WorldModelClient

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "vla_mbpo.v1.WorldModel"]
SLOW_ENGINE = EngineConfig(block_size=8, num_kv_blocks=4096, max_num_seqs=2)  # 2 branches per step


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vla_mbpo.v1.WorldModel"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert sorted(ProtoReflectionDescriptorDatabase(channel).get_services()) == SERVICES
        # grpcurl-style: the service's descriptor is discoverable, with all five RPCs.
        pool_file = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("vla_mbpo.v1.WorldModel")
        assert [m.name for m in pool_file.service[0].method] == [
            "GetModelInfo", "CreateStates", "Imagine", "ReleaseStates", "GetStats"]


def test_auth_on(start_server):
    server = start_server(token="s3cret")
    channel, raw = stub(server.target)
    with channel:
        for metadata, message in [((), "missing `authorization: Bearer <token>` metadata"),
                                  ((("authorization", "Bearer wrong"),), "invalid bearer token"),
                                  ((("authorization", "s3cret"),), "invalid bearer token")]:
            with pytest.raises(grpc.RpcError) as info:
                raw.GetStats(pb.GetStatsRequest(), metadata=metadata, timeout=10)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        with pytest.raises(grpc.RpcError) as info:
            list(raw.Imagine(pb.ImagineRequest(), timeout=10))  # streams are guarded too
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for probes; reflection needs the token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter(ask), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (reply,) = reflection.ServerReflectionInfo(iter(ask), metadata=[("authorization", "Bearer s3cret")],
                                                   timeout=10)
        assert sorted(s.name for s in reply.list_services_response.service) == SERVICES
    with WorldModelClient(server.target, token="s3cret") as client:
        ids = client.create_states(["pick"], observations(1))
        assert client.release(ids) == 1
    with WorldModelClient(server.target) as client, pytest.raises(RolloutServerError) as info:
        client.stats()
    assert str(info.value) == ("GetStats failed with UNAUTHENTICATED: missing `authorization: Bearer <token>` "
                               "metadata")


def test_auth_off_accepts_any_metadata(server):
    with WorldModelClient(server.target, token="whatever") as client:
        assert client.stats().live_states == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
def test_tls(start_server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server = start_server(tls_cert=str(cert), tls_key=str(key), token="t")
    with WorldModelClient(server.target, token="t", root_certificates=cert.read_bytes(), server_name="localhost",
                          timeout=10) as client:
        ids = client.create_states(["pick"], observations(1))
        assert len(list(client.imagine(ids, action_chunks(1)))) == 1
        client.release(ids)
    with WorldModelClient(server.target, token="t", timeout=5) as plaintext, pytest.raises(RolloutServerError) as info:
        plaintext.stats()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint_matches_get_stats(start_server):
    server = start_server(metrics_port=0)
    with WorldModelClient(server.target) as client:
        ids = client.create_states(["pick"] * 3, observations(3))
        list(client.imagine(ids, action_chunks(3)))
        stats = client.stats()
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read()
        client.release(ids)
    lines = body.decode().splitlines()
    assert "vla_mbpo_live_states 3.0" in lines and stats.live_states == 3
    assert f"vla_mbpo_kv_blocks_used {float(stats.kv_blocks_used)}" in lines
    assert f"vla_mbpo_kv_blocks_capacity {float(stats.kv_blocks_total)}" in lines
    assert "vla_mbpo_branches_completed_total 3.0" in lines
    assert 'vla_mbpo_request_latency_seconds_count{code="OK",method="CreateStates"} 1.0' in lines
    assert 'vla_mbpo_request_latency_seconds_count{code="OK",method="Imagine"} 1.0' in lines
    assert "vla_mbpo_imagine_first_result_seconds_count 1.0" in lines
    assert any(line.startswith("vla_mbpo_tokens_per_second ") for line in lines)


def test_unused_states_expire(start_server):
    server = start_server(state_ttl=0.6, housekeeping_interval=0.05)
    with WorldModelClient(server.target) as client:
        kept_alive, forgotten = client.create_states(["a", "b"], observations(2))
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # use one state every 0.2 s; never touch the other
            assert len(list(client.imagine([kept_alive], action_chunks(1)))) == 1
            time.sleep(0.2)
        with pytest.raises(RolloutServerError) as info:
            list(client.imagine([forgotten], action_chunks(1)))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.details == (f"branches[0].state_id={forgotten!r}: unknown state (never created, released "
                                      "or expired after 0.6s unused)")
        assert client.stats().live_states == 1
        assert server.server.metrics.registry.get_sample_value("vla_mbpo_states_expired_total") == 1
        client.release([kept_alive])


def test_cancelled_imagine_stops_and_frees_its_work(start_server):
    server = start_server(SLOW_ENGINE)
    with WorldModelClient(server.target) as client:
        (root,) = client.create_states(["pick"], observations(1))
        held_by_root = client.stats().kv_blocks_used
        stream = client.imagine([root] * 512, action_chunks(512))
        next(stream)
        stream.close()  # cancels the call
        wait_for(lambda: client.stats().queue_depth == 0)
        stats = client.stats()
        assert stats.branches_completed < 100  # far from all 512: the work stopped
        assert stats.kv_blocks_used == held_by_root  # every aborted branch's blocks came back
        wait_for(lambda: server.server.metrics.registry.get_sample_value(
            "vla_mbpo_request_latency_seconds_count", {"method": "Imagine", "code": "CANCELLED"}) == 1)
        client.release([root])


def test_imagine_deadline_stops_the_work(start_server):
    server = start_server(SLOW_ENGINE)
    with WorldModelClient(server.target) as client:
        (root,) = client.create_states(["pick"], observations(1))
        held_by_root = client.stats().kv_blocks_used
        with pytest.raises(RolloutServerError) as info:
            list(client.imagine([root] * 512, action_chunks(512), timeout=0.3))
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.attempts == 1
        wait_for(lambda: client.stats().queue_depth == 0)
        stats = client.stats()
        assert stats.branches_completed < 512 and stats.kv_blocks_used == held_by_root
        client.release([root])


def test_cancelled_kept_branches_leak_nothing_after_the_ttl(start_server):
    server = start_server(SLOW_ENGINE, state_ttl=0.5, housekeeping_interval=0.05)
    with WorldModelClient(server.target) as client:
        roots = client.create_states(["pick"], observations(1))
        stream = client.imagine(roots * 256, action_chunks(256), keep_state=True)
        received = [next(stream).state_id for _ in range(5)]
        stream.close()
        assert len(set(received)) == 5
        # Every state -- the root, the kept results the client saw and any it did not -- expires.
        wait_for(lambda: (s := client.stats()).live_states == 0 and s.queue_depth == 0 and s.kv_blocks_used == 0)
    assert len(server.server.leases) == 0


def test_cli_help_lists_server_and_engine_flags(capsys):
    with pytest.raises(SystemExit) as info:
        server_module.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--token", "--tls-cert", "--tls-key", "--metrics-port",
                 "--state-ttl", "--max-states-per-client", "--max-branches-per-request", "--engine-num-kv-blocks",
                 "--engine-max-num-seqs", "--no-engine-enable-prefix-caching"):
        assert flag in out


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert server_module.main(["--checkpoint", str(tmp_path / "nope"), "--port", "0"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"vla-mbpo serve: {tmp_path / 'nope'}: checkpoint directory "
                                                   "not found")


def test_busy_port_fails_to_start(server, tiny_checkpoint):
    busy = RolloutServer(Engine.from_checkpoint(tiny_checkpoint, EngineConfig(num_kv_blocks=64)),
                         ServerConfig(checkpoint=str(tiny_checkpoint), port=server.port))
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{server.port}"):
            asyncio.run(busy.start())
    finally:
        busy.async_engine.close()


def test_sigterm_stops_gracefully(tiny_checkpoint):
    """The real CLI in a subprocess: SIGTERM flips health to NOT_SERVING, cancels what outlives the grace
    period, releases every state and exits 0 with one log line at start and one at stop."""
    command = [sys.executable, "-m", "vla_mbpo.cli", "serve", "--checkpoint", str(tiny_checkpoint), "--port", "0",
               "--grace-period", "0.3", "--engine-max-num-seqs", "2", "--engine-num-kv-blocks", "4096",
               "--engine-block-size", "8"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        started = wait_for(lambda: [line for line in log if " serving " in line], timeout=60)[0]
        port = int(re.search(r" on 127\.0\.0\.1:(\d+): model tiny ", started).group(1))
        target = f"127.0.0.1:{port}"
        statuses: list[int] = []
        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICES[2]))
        watcher = threading.Thread(target=lambda: _collect_statuses(watch, statuses), daemon=True)
        watcher.start()
        with WorldModelClient(target) as client:
            roots = client.create_states(["a", "b"], observations(2))
            stream = client.imagine(roots[:1] * 1024, action_chunks(1024))
            next(stream)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(RolloutServerError) as info:
                list(stream)  # cut off after the grace period
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert proc.wait(timeout=30) == 0
        watcher.join(timeout=10)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    lines = [line for line in log if "vla_mbpo.runtime" in line]
    assert len(lines) == 2 and lines[0] is started
    assert re.search(rf"stopped vla_mbpo\.v1\.WorldModel on {target} after \d+\.\ds: calls in flight at stop 1, "
                     r"live states released 2$", lines[1].strip())


def _collect_statuses(watch, statuses: list[int]) -> None:
    try:
        for reply in watch:
            statuses.append(reply.status)
    except grpc.RpcError:  # the server went away: the watch ends
        pass
