"""runtime.convert: every wire check with its status code and exact message, and the engine -> wire mapping."""

from __future__ import annotations

from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from engine.types import BranchResult, EngineStats, ModelInfo, SamplingParams
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from runtime import convert
from runtime.convert import RequestLimits
from runtime.errors import RequestError

INFO = ModelInfo(views=("head", "wrist"), image_height=4, image_width=6, chunk_size=2, action_dim=3,
                 action_low=(-1.0, -1.0, 0.0), action_high=(1.0, 1.0, 1.0), tokens_per_view=4,
                 max_chunks_per_branch=3, model_name="tiny", model_version="abc123")
LIMITS = RequestLimits(max_states_per_request=3, max_branches_per_request=4, max_instruction_bytes=10)


def image(view: str, height: int = 4, width: int = 6, fill: int = 7, num_bytes: int | None = None) -> pb.Image:
    rgb = bytes([fill]) * (height * width * 3 if num_bytes is None else num_bytes)
    return pb.Image(view=view, height=height, width=width, rgb=rgb)


def state(*images: pb.Image, instruction: str = "pick") -> pb.StartState:
    return pb.StartState(instruction=instruction, observation=pb.Observation(images=list(images)))


def create(*states: pb.StartState) -> pb.CreateStatesRequest:
    return pb.CreateStatesRequest(states=list(states))


@contextmanager
def raises(code: grpc.StatusCode, message: str):
    """Expects a RequestError with this code and this exact message."""
    with pytest.raises(RequestError) as info:
        yield
    assert (info.value.code, info.value.message) == (code, message)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_start_states_round_trip_any_view_order():
    req = create(state(image("wrist", fill=2), image("head", fill=1)), state(image("head"), image("wrist")))
    states = convert.start_states_from_proto(req, INFO, LIMITS)
    assert [s.instruction for s in states] == ["pick", "pick"]
    assert list(states[0].images) == ["head", "wrist"]  # the model's view order, whatever the wire order
    assert states[0].images["head"].shape == (4, 6, 3) and states[0].images["head"].dtype == np.uint8
    assert int(states[0].images["head"][0, 0, 0]) == 1 and int(states[0].images["wrist"][3, 5, 2]) == 2


@pytest.mark.parametrize(("request_", "code", "message"), [
    (create(), INVALID, "states is empty; send at least one"),
    (create(*[state(image("head"), image("wrist"))] * 4), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "states has 4 entries, more than max_states_per_request=3; split the request"),
    (create(state(image("head"), image("wrist"), instruction="")), INVALID, "states[0].instruction is empty"),
    (create(state(image("head"), image("wrist"), instruction="é" * 6)), INVALID,
     "states[0].instruction is 12 UTF-8 bytes, more than max_instruction_bytes=10"),
    (create(state(image("head"), image("side"))), INVALID,
     "states[0].observation.images[1]: unknown view 'side'; the model's views are ['head', 'wrist']"),
    (create(state(image("head"), image("head"))), INVALID,
     "states[0].observation.images[1]: view 'head' appears more than once"),
    (create(state(image("head"))), INVALID,
     "states[0].observation: missing view(s) ['wrist']; every observation needs ['head', 'wrist']"),
    (create(state(image("head"), image("wrist")), state(image("head"), image("wrist", height=5))), INVALID,
     "states[1].observation.images[1] ('wrist'): image is 5x6, the model needs 4x6"),
    (create(state(image("head", num_bytes=71), image("wrist"))), INVALID,
     "states[0].observation.images[0] ('head'): rgb has 71 bytes, expected height*width*3 = 72"),
])
def test_bad_start_states(request_, code, message):
    with raises(code, message):
        convert.start_states_from_proto(request_, INFO, LIMITS)


def branch(state_id: str = "s1", actions=None, seed: int = 0, keep: bool = False) -> pb.Branch:
    return pb.Branch(state_id=state_id, actions=[0.5] * 6 if actions is None else actions, seed=seed,
                     keep_state=keep)


def test_branches_round_trip():
    req = pb.ImagineRequest(branches=[branch("a", [0, 1, 2, 3, 4, 5], seed=2**63 - 1, keep=True), branch("a")])
    parsed = convert.branches_from_proto(req, INFO, LIMITS)
    assert [(b.state_id, b.seed, b.keep_state) for b in parsed] == [("a", 2**63 - 1, True), ("a", 0, False)]
    assert parsed[0].actions.dtype == np.float32
    np.testing.assert_array_equal(parsed[0].actions, [[0, 1, 2], [3, 4, 5]])  # time-major [chunk, dim]
    engine_request = parsed[0].to_engine(17)
    assert (engine_request.state_id, engine_request.seed, engine_request.keep_state) == (17, 2**63 - 1, True)


@pytest.mark.parametrize(("branches", "code", "message"), [
    ([], INVALID, "branches is empty; send at least one"),
    ([branch()] * 5, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "branches has 5 entries, more than max_branches_per_request=4; split the request"),
    ([branch(), branch("")], INVALID, "branches[1].state_id is empty"),
    ([branch(actions=[0.0] * 5)], INVALID,
     "branches[0].actions has 5 values, expected chunk_size*action_dim = 2*3 = 6"),
    ([branch(actions=[0, 0, float("nan"), 0, 0, 0])], INVALID, "branches[0].actions[2] is nan; actions must be finite"),
    ([branch(), branch(actions=[0, 0, 0, 0, 0, float("-inf")])], INVALID,
     "branches[1].actions[5] is -inf; actions must be finite"),
    ([branch(seed=2**63)], INVALID, "branches[0].seed=9223372036854775808 is larger than the maximum 2**63-1"),
])
def test_bad_branches(branches, code, message):
    with raises(code, message):
        convert.branches_from_proto(pb.ImagineRequest(branches=branches), INFO, LIMITS)


def test_sampling_defaults_and_errors():
    assert convert.sampling_from_proto(pb.SamplingParams()) == SamplingParams(temperature=0.0, top_k=0, top_p=1.0)
    assert convert.sampling_from_proto(pb.SamplingParams(temperature=0.5, top_k=3, top_p=0.25)) == SamplingParams(
        temperature=0.5, top_k=3, top_p=0.25)
    with raises(INVALID, "sampling: temperature must be finite and >= 0, got nan"):
        convert.sampling_from_proto(pb.SamplingParams(temperature=float("nan")))
    with raises(INVALID, "sampling: temperature must be finite and >= 0, got -1.0"):
        convert.sampling_from_proto(pb.SamplingParams(temperature=-1))
    with raises(INVALID, "sampling: top_p must lie in (0, 1], got 1.5"):
        convert.sampling_from_proto(pb.SamplingParams(top_p=1.5))


def test_state_ids():
    assert convert.state_ids_from_proto(["a", "b"]) == ["a", "b"]
    with raises(INVALID, "state_ids is empty; send at least one"):
        convert.state_ids_from_proto([])
    with raises(INVALID, "state_ids[1] is empty"):
        convert.state_ids_from_proto(["a", ""])
    with raises(INVALID, "state_ids[2]='a' repeats state_ids[0]"):
        convert.state_ids_from_proto(["a", "b", "a"])


def test_model_info_to_proto():
    msg = convert.model_info_to_proto(INFO, LIMITS)
    assert list(msg.views) == ["head", "wrist"]
    assert (msg.image_height, msg.image_width, msg.chunk_size, msg.action_dim, msg.tokens_per_view) == (4, 6, 2, 3, 4)
    assert list(msg.action_low) == [-1.0, -1.0, 0.0] and list(msg.action_high) == [1.0, 1.0, 1.0]
    assert (msg.max_chunks_per_branch, msg.model_name, msg.model_version) == (3, "tiny", "abc123")
    assert (msg.max_states_per_request, msg.max_branches_per_request) == (3, 4)


def test_result_to_proto():
    head = np.arange(72, dtype=np.uint8).reshape(4, 6, 3)
    wrist = np.full((4, 6, 3), 9, dtype=np.uint8)
    result = BranchResult(index=5, state_id=3, success_prob=0.75, success=True,
                          tokens=np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), images={"wrist": wrist, "head": head})
    msg = convert.result_to_proto(result, "feed", INFO)
    assert (msg.index, msg.state_id, msg.success_prob, msg.success) == (5, "feed", 0.75, True)
    assert list(msg.tokens) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [(i.view, i.height, i.width) for i in msg.observation.images] == [("head", 4, 6), ("wrist", 4, 6)]
    assert msg.observation.images[0].rgb == head.tobytes()
    bare = convert.result_to_proto(BranchResult(index=0, state_id=None, success_prob=0.5, success=False), "", INFO)
    assert not bare.HasField("observation") and list(bare.tokens) == [] and bare.state_id == ""


def test_stats_to_proto():
    stats = EngineStats(kv_blocks_total=64, kv_blocks_used=10, kv_blocks_cached=5, live_states=3, queue_depth=2,
                        tokens_generated=1000, prefix_cache_queries=8, prefix_cache_hits=2, branches_completed=40)
    msg = convert.stats_to_proto(stats, 123.5)
    assert (msg.kv_blocks_total, msg.kv_blocks_used, msg.kv_blocks_cached, msg.live_states, msg.queue_depth,
            msg.tokens_generated, msg.branches_completed) == (64, 10, 5, 3, 2, 1000, 40)
    assert msg.prefix_cache_hit_rate == 0.25 and msg.tokens_per_second == 123.5
