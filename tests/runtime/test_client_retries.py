"""trainer.rollout_client retry and error behaviour, against a scripted in-process WorldModel server.

The scripted server fails the first calls with a chosen status; the real server's behaviour is covered
end to end in test_server.py.
"""

from __future__ import annotations

import random
import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from protos.vla_mbpo.v1 import world_model_pb2 as pb
from protos.vla_mbpo.v1 import world_model_pb2_grpc
from trainer.rollout_client import RetryPolicy, RolloutServerError, WorldModelClient, encode_image

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


class ScriptedServicer(world_model_pb2_grpc.WorldModelServicer):
    """Fails the first `failures` calls of each method with `code`; Imagine can fail after one result."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 fail_mid_stream: bool = False) -> None:
        self.failures = failures
        self.code = code
        self.fail_mid_stream = fail_mid_stream
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _count(self, method: str, context) -> int:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.metadata.append(dict(context.invocation_metadata()))
            return self.calls[method]

    def GetStats(self, request, context):
        if self._count("GetStats", context) <= self.failures:
            context.abort(self.code, "scripted failure")
        return pb.Stats(live_states=4, kv_blocks_total=32, tokens_per_second=1.5)

    def Imagine(self, request, context):
        if self._count("Imagine", context) <= self.failures:
            if self.fail_mid_stream:
                yield pb.ImagineResult(index=0, success_prob=0.5)
            context.abort(self.code, "scripted failure")
        for i, branch in enumerate(request.branches):
            yield pb.ImagineResult(index=i, state_id=f"n{i}" if branch.keep_state else "",
                                   success_prob=branch.actions[0], success=branch.seed % 2 == 1)


@pytest.fixture
def scripted():
    servers = []

    def start(servicer: ScriptedServicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        world_model_pb2_grpc.add_WorldModelServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_is_retried_then_succeeds(scripted):
    servicer = ScriptedServicer(failures=2)
    with WorldModelClient(scripted(servicer), retry=FAST_RETRY, token="t0k", client_id="me") as client:
        stats = client.stats()
    assert (stats.live_states, stats.kv_blocks_total, stats.tokens_per_second) == (4, 32, 1.5)
    assert servicer.calls == {"GetStats": 3}
    assert all(m["authorization"] == "Bearer t0k" and m["x-client-id"] == "me" for m in servicer.metadata)


def test_retries_give_up_after_max_attempts(scripted):
    servicer = ScriptedServicer(failures=5)
    with WorldModelClient(scripted(servicer), retry=FAST_RETRY) as client, \
            pytest.raises(RolloutServerError) as info:
        client.stats()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 3
    assert str(info.value) == "GetStats failed with UNAVAILABLE after 3 attempts: scripted failure"
    assert servicer.calls == {"GetStats": 3}


def test_other_codes_are_not_retried(scripted):
    servicer = ScriptedServicer(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with WorldModelClient(scripted(servicer), retry=FAST_RETRY) as client, \
            pytest.raises(RolloutServerError, match="^GetStats failed with RESOURCE_EXHAUSTED: scripted failure$"):
        client.stats()
    assert servicer.calls == {"GetStats": 1}


def test_imagine_retried_only_before_the_first_result(scripted):
    servicer = ScriptedServicer(failures=1)
    actions = np.array([[[0.25]], [[0.75]]], dtype=np.float32)  # [2 branches, chunk 1, dim 1]
    with WorldModelClient(scripted(servicer), retry=FAST_RETRY) as client:
        results = list(client.imagine(["a", "b"], actions, seeds=[4, 7], keep_state=[True, False]))
    assert servicer.calls == {"Imagine": 2}
    assert [(r.index, r.state_id, r.success_prob, r.success) for r in results] == [
        (0, "n0", 0.25, False), (1, None, 0.75, True)]

    broken = ScriptedServicer(failures=1, fail_mid_stream=True)
    with WorldModelClient(scripted(broken), retry=FAST_RETRY) as client:
        stream = client.imagine(["a"], actions[:1])
        assert next(stream).index == 0
        with pytest.raises(RolloutServerError, match="^Imagine failed with UNAVAILABLE: scripted failure$"):
            next(stream)
    assert broken.calls == {"Imagine": 1}  # a half-delivered stream is never replayed


def test_nothing_listening_is_unavailable_after_retries():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with WorldModelClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=5) as client, \
            pytest.raises(RolloutServerError) as info:
        client.stats()
    assert (info.value.code, info.value.attempts) == (grpc.StatusCode.UNAVAILABLE, 3)


def test_backoff_grows_exponentially_within_jitter():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(0)
    assert [policy.backoff(k, rng) for k in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = RetryPolicy(initial_backoff=0.1, jitter=0.2)
    assert all(0.08 <= jittered.backoff(0, rng) <= 0.12 for _ in range(100))
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0"):
        RetryPolicy(max_attempts=0)


def test_client_side_input_errors():
    client = WorldModelClient("127.0.0.1:1")
    with pytest.raises(ValueError, match=r"actions must be \[num_branches=2, chunk_size, action_dim\], got \(2, 3\)"):
        client.imagine(["a", "b"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"need one seed and one keep_state per branch \(1\), got 2 seeds"):
        client.imagine(["a"], np.zeros((1, 2, 3)), seeds=[1, 2])
    with pytest.raises(ValueError, match="1 instructions but 0 observations"):
        client.create_states(["x"], [])
    with pytest.raises(ValueError, match=r"obs\[0\]\['head'\] must be uint8 \[H, W, 3\], got float64 \[4, 4, 3\]"):
        encode_image("head", np.zeros((4, 4, 3)), "obs[0]['head']")
    client.close()
