"""Every bad input through the real server, with its status code and message; the server keeps serving."""

from __future__ import annotations

import re

import grpc
import pytest

from engine.config import EngineConfig
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from tests.runtime.conftest import action_chunks, observations, stub
from trainer.rollout_client import RolloutServerError, WorldModelClient, encode_image

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def good_state(instruction: str = "pick", size: int = 8) -> pb.StartState:
    obs = observations(1)[0]
    state = pb.StartState(instruction=instruction)
    for view, image in obs.items():
        state.observation.images.append(encode_image(view, image))
        state.observation.images[-1].height = size
    return state


def rpc_error(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=30)
        if not isinstance(result, pb.CreateStatesResponse | pb.ReleaseStatesResponse | pb.Stats | pb.ModelInfo):
            list(result)  # a stream fails when read
    return info.value.code(), info.value.details()


def imagine_request(state_id: str, actions: list[float] | None = None, **fields) -> pb.ImagineRequest:
    branch = pb.Branch(state_id=state_id, actions=[0.1] * 4 if actions is None else actions, **fields)
    return pb.ImagineRequest(branches=[branch], sampling=pb.SamplingParams(temperature=1.0))


def test_bad_create_states(server):
    channel, raw = stub(server.target)
    wrong_view = good_state()
    wrong_view.observation.images[1].view = "side"
    short_bytes = good_state()
    short_bytes.observation.images[0].rgb = b"\0" * 191
    missing_view = good_state()
    del missing_view.observation.images[1]
    cases = [
        (pb.CreateStatesRequest(), INVALID, "states is empty; send at least one"),
        (pb.CreateStatesRequest(states=[good_state(size=16)]), INVALID,
         "states[0].observation.images[0] ('head'): image is 16x8, the model needs 8x8"),
        (pb.CreateStatesRequest(states=[good_state(), wrong_view]), INVALID,
         "states[1].observation.images[1]: unknown view 'side'; the model's views are ['head', 'wrist']"),
        (pb.CreateStatesRequest(states=[missing_view]), INVALID,
         "states[0].observation: missing view(s) ['wrist']; every observation needs ['head', 'wrist']"),
        (pb.CreateStatesRequest(states=[short_bytes]), INVALID,
         "states[0].observation.images[0] ('head'): rgb has 191 bytes, expected height*width*3 = 192"),
        (pb.CreateStatesRequest(states=[good_state("x" * 33)]), INVALID,
         "states[0].instruction is 33 UTF-8 bytes, more than max_instruction_bytes=32"),
        (pb.CreateStatesRequest(states=[good_state("")]), INVALID, "states[0].instruction is empty"),
        (pb.CreateStatesRequest(states=[good_state()] * 1025), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "states has 1025 entries, more than max_states_per_request=1024; split the request"),
    ]
    with channel:
        for request, code, message in cases:
            assert rpc_error(raw.CreateStates, request) == (code, message)
        ok = raw.CreateStates(pb.CreateStatesRequest(states=[good_state()]), timeout=30)  # still serving
        raw.ReleaseStates(pb.ReleaseStatesRequest(state_ids=ok.state_ids), timeout=30)


def test_bad_imagine_and_release(server):
    channel, raw = stub(server.target)
    with channel:
        (state_id,) = raw.CreateStates(pb.CreateStatesRequest(states=[good_state()]), timeout=30).state_ids
        released = raw.CreateStates(pb.CreateStatesRequest(states=[good_state("other")]), timeout=30).state_ids
        assert raw.ReleaseStates(pb.ReleaseStatesRequest(state_ids=released), timeout=30).num_released == 1
        nan = float("nan")
        too_many = pb.ImagineRequest(branches=[pb.Branch(state_id=state_id, actions=[0] * 4)] * 8193)
        cases = [
            (raw.Imagine, imagine_request(state_id, [0.1] * 3), INVALID,
             "branches[0].actions has 3 values, expected chunk_size*action_dim = 2*2 = 4"),
            (raw.Imagine, imagine_request(state_id, [0.1, nan, 0, 0]), INVALID,
             "branches[0].actions[1] is nan; actions must be finite"),
            (raw.Imagine, imagine_request(state_id, [0.1, 0, float("inf"), 0]), INVALID,
             "branches[0].actions[2] is inf; actions must be finite"),
            (raw.Imagine, imagine_request("feedfeedfeedfeed"), grpc.StatusCode.NOT_FOUND,
             "branches[0].state_id='feedfeedfeedfeed': unknown state (never created, released or expired after "
             "600s unused)"),
            (raw.Imagine, imagine_request(released[0]), grpc.StatusCode.NOT_FOUND,
             f"branches[0].state_id={released[0]!r}: unknown state (never created, released or expired after "
             "600s unused)"),
            (raw.Imagine, imagine_request(state_id, seed=2**64 - 1), INVALID,
             "branches[0].seed=18446744073709551615 is larger than the maximum 2**63-1"),
            (raw.Imagine, pb.ImagineRequest(branches=imagine_request(state_id).branches,
                                            sampling=pb.SamplingParams(temperature=-0.5)), INVALID,
             "sampling: temperature must be finite and >= 0, got -0.5"),
            (raw.Imagine, pb.ImagineRequest(branches=imagine_request(state_id).branches,
                                            sampling=pb.SamplingParams(top_p=2.0)), INVALID,
             "sampling: top_p must lie in (0, 1], got 2.0"),
            (raw.Imagine, too_many, grpc.StatusCode.RESOURCE_EXHAUSTED,
             "branches has 8193 entries, more than max_branches_per_request=8192; split the request"),
            (raw.ReleaseStates, pb.ReleaseStatesRequest(state_ids=[state_id, released[0]]), grpc.StatusCode.NOT_FOUND,
             f"state_ids[1]={released[0]!r}: unknown state (never created, released or expired after 600s unused)"),
            (raw.ReleaseStates, pb.ReleaseStatesRequest(state_ids=[state_id, state_id]), INVALID,
             f"state_ids[1]={state_id!r} repeats state_ids[0]"),
            (raw.ReleaseStates, pb.ReleaseStatesRequest(), INVALID, "state_ids is empty; send at least one"),
        ]
        for call, request, code, message in cases:
            assert rpc_error(call, request) == (code, message)
        # The failed release released nothing; the state still imagines.
        assert len(list(raw.Imagine(imagine_request(state_id), timeout=30))) == 1
        assert raw.ReleaseStates(pb.ReleaseStatesRequest(state_ids=[state_id]), timeout=30).num_released == 1


def test_per_client_state_limit_spares_other_clients(start_server):
    server = start_server(max_states_per_client=6)
    with WorldModelClient(server.target, client_id="greedy") as greedy, \
            WorldModelClient(server.target, client_id="polite") as polite:
        roots = greedy.create_states(["a"] * 2, observations(2))
        kept = [r.state_id for r in greedy.imagine(roots * 2, action_chunks(4), keep_state=True)]
        with pytest.raises(RolloutServerError) as info:
            list(greedy.imagine(roots, action_chunks(2), keep_state=True))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details == ("client 'greedy' holds 6 live states (0 more reserved by calls in flight); 2 "
                                      "more would pass max_states_per_client=6: release some")
        with pytest.raises(RolloutServerError, match="client 'greedy' holds 6 live states"):
            greedy.create_states(["b"], observations(1))
        assert len(list(greedy.imagine(roots, action_chunks(2), keep_state=False))) == 2  # keeps nothing: fine
        other = polite.create_states(["c"] * 6, observations(6))  # everyone else is served
        greedy.release(kept[:2])
        extra = greedy.create_states(["b"], observations(1))
        assert server.server.leases.num_states("greedy") == 5
        greedy.release(roots + kept[2:] + extra)
        polite.release(other)


def test_kv_exhaustion_is_resource_exhausted_and_recoverable(start_server):
    server = start_server(EngineConfig(block_size=8, num_kv_blocks=24))
    with WorldModelClient(server.target) as client:
        roots = client.create_states(["a"], observations(1))
        kept: list[str] = []
        with pytest.raises(RolloutServerError) as info:
            for _ in range(3):  # each round keeps 4 more branches until the cache is full of held states
                parents = roots * 4 if not kept else kept[-4:]
                for result in client.imagine(parents, action_chunks(4), keep_state=True):
                    kept.append(result.state_id)  # one by one: a failing call may have kept some already
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(r"KV cache exhausted: \d+ of 24 blocks are held by \d+ live states and a \d+-token stream "
                            r"does not fit; release states or raise num_kv_blocks", info.value.details)
        client.release(kept)
        assert len(list(client.imagine(roots * 4, action_chunks(4)))) == 4  # room again
        client.release(roots)


def test_bad_client_id_header(server):
    channel, raw = stub(server.target)
    with channel, pytest.raises(grpc.RpcError) as info:
        raw.CreateStates(pb.CreateStatesRequest(states=[good_state()]), metadata=[("x-client-id", "x" * 129)],
                         timeout=30)
    assert info.value.code() == INVALID
    assert info.value.details().startswith("x-client-id must be 1-128 printable characters, got 'xxx")


def test_oversize_message_is_resource_exhausted(start_server):
    server = start_server(max_message_mb=1)
    channel, raw = stub(server.target)
    big = pb.CreateStatesRequest(states=[good_state("pad " * 8)] * 6000)  # 6,000 x 384 image bytes > 1 MiB
    with channel:
        code, message = rpc_error(raw.CreateStates, big)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(r"SERVER: Received message larger than max \(\d+ vs\. 1048576\)", message)
        assert raw.GetStats(pb.GetStatsRequest(), timeout=30).live_states == 0  # and it keeps serving
