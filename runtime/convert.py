"""The only mapping between wire messages (protos) and engine boundary objects (engine.types).

Every check a request can fail before it reaches the engine lives here, and each failure is a
`RequestError` whose message names the field by its path in the request (`states[2].observation...`).
State ids are not mapped here: wire ids <-> engine ids is the lease table's job (runtime.leases).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from engine.types import (
    MAX_SEED,
    BranchRequest,
    BranchResult,
    EngineStats,
    InvalidRequestError,
    ModelInfo,
    SamplingParams,
    StartState,
)
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from runtime.errors import RequestError, invalid


@dataclass(frozen=True)
class RequestLimits:
    """Size limits the server enforces per request (oversize -> RESOURCE_EXHAUSTED)."""

    max_states_per_request: int
    max_branches_per_request: int
    max_instruction_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_states_per_request", "max_branches_per_request", "max_instruction_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class WireBranch:
    """One Imagine branch after validation; `state_id` is still the wire id."""

    state_id: str
    actions: np.ndarray  # [chunk_size, action_dim] float32, finite
    seed: int
    keep_state: bool

    def to_engine(self, engine_state_id: int) -> BranchRequest:
        return BranchRequest(state_id=engine_state_id, actions=self.actions, seed=self.seed,
                             keep_state=self.keep_state)


# ---- engine -> wire ---------------------------------------------------------------------------------

def model_info_to_proto(info: ModelInfo, limits: RequestLimits) -> pb.ModelInfo:
    return pb.ModelInfo(
        views=list(info.views), image_height=info.image_height, image_width=info.image_width,
        chunk_size=info.chunk_size, action_dim=info.action_dim, action_low=list(info.action_low),
        action_high=list(info.action_high), tokens_per_view=info.tokens_per_view,
        max_chunks_per_branch=info.max_chunks_per_branch, model_name=info.model_name,
        model_version=info.model_version, max_states_per_request=limits.max_states_per_request,
        max_branches_per_request=limits.max_branches_per_request)


def observation_to_proto(images: dict[str, np.ndarray], info: ModelInfo) -> pb.Observation:
    """view -> uint8 [H, W, 3] in the model's view order."""
    out = pb.Observation()
    for view in info.views:
        rgb = np.ascontiguousarray(images[view], dtype=np.uint8)  # [H, W, 3]
        out.images.add(view=view, height=rgb.shape[0], width=rgb.shape[1], rgb=rgb.tobytes())
    return out


def result_to_proto(result: BranchResult, wire_state_id: str, info: ModelInfo) -> pb.ImagineResult:
    """engine.types.BranchResult -> ImagineResult; `wire_state_id` is "" unless the branch was kept."""
    msg = pb.ImagineResult(index=result.index, state_id=wire_state_id, success_prob=result.success_prob,
                           success=result.success)
    if result.tokens is not None:
        msg.tokens.extend(np.asarray(result.tokens).reshape(-1).tolist())  # [num_views * tokens_per_view]
    if result.images is not None:
        msg.observation.CopyFrom(observation_to_proto(result.images, info))
    return msg


def stats_to_proto(stats: EngineStats, tokens_per_second: float) -> pb.Stats:
    return pb.Stats(
        kv_blocks_total=stats.kv_blocks_total, kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_cached=stats.kv_blocks_cached, live_states=stats.live_states, queue_depth=stats.queue_depth,
        tokens_generated=stats.tokens_generated, prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        branches_completed=stats.branches_completed, tokens_per_second=tokens_per_second)


# ---- wire -> engine ---------------------------------------------------------------------------------

def _check_count(what: str, count: int, limit: int, limit_name: str) -> None:
    if count == 0:
        raise invalid(f"{what} is empty; send at least one")
    if count > limit:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{what} has {count} entries, more than {limit_name}={limit}; split the request")


def observation_from_proto(obs: pb.Observation, info: ModelInfo, where: str) -> dict[str, np.ndarray]:
    """Exactly one image per model view, each uint8 [H, W, 3] of the model's size (any order on the wire)."""
    images: dict[str, np.ndarray] = {}
    for i, image in enumerate(obs.images):
        at = f"{where}.images[{i}]"
        if image.view not in info.views:
            raise invalid(f"{at}: unknown view {image.view!r}; the model's views are {list(info.views)}")
        if image.view in images:
            raise invalid(f"{at}: view {image.view!r} appears more than once")
        if (image.height, image.width) != (info.image_height, info.image_width):
            raise invalid(f"{at} ({image.view!r}): image is {image.height}x{image.width}, the model needs "
                          f"{info.image_height}x{info.image_width}")
        expected = info.image_height * info.image_width * 3
        if len(image.rgb) != expected:
            raise invalid(f"{at} ({image.view!r}): rgb has {len(image.rgb)} bytes, expected height*width*3 = "
                          f"{expected}")
        # Zero-copy, read-only view of the message bytes: the engine only reads images.
        images[image.view] = np.frombuffer(image.rgb, dtype=np.uint8).reshape(image.height, image.width, 3)
    missing = [v for v in info.views if v not in images]
    if missing:
        raise invalid(f"{where}: missing view(s) {missing}; every observation needs {list(info.views)}")
    return {view: images[view] for view in info.views}


def start_states_from_proto(request: pb.CreateStatesRequest, info: ModelInfo,
                            limits: RequestLimits) -> list[StartState]:
    _check_count("states", len(request.states), limits.max_states_per_request, "max_states_per_request")
    states = []
    for i, state in enumerate(request.states):
        size = len(state.instruction.encode("utf-8"))
        if size == 0:
            raise invalid(f"states[{i}].instruction is empty")
        if size > limits.max_instruction_bytes:
            raise invalid(f"states[{i}].instruction is {size} UTF-8 bytes, more than max_instruction_bytes="
                          f"{limits.max_instruction_bytes}")
        images = observation_from_proto(state.observation, info, f"states[{i}].observation")
        states.append(StartState(instruction=state.instruction, images=images))
    return states


def sampling_from_proto(sampling: pb.SamplingParams) -> SamplingParams:
    """Proto defaults read as: temperature 0 = greedy, top_k 0 = no limit, top_p 0 = 1 (no limit)."""
    try:
        return SamplingParams(temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                              top_p=float(sampling.top_p) if sampling.top_p != 0 else 1.0)
    except InvalidRequestError as exc:
        raise invalid(f"sampling: {exc}") from None


def branches_from_proto(request: pb.ImagineRequest, info: ModelInfo, limits: RequestLimits) -> list[WireBranch]:
    _check_count("branches", len(request.branches), limits.max_branches_per_request, "max_branches_per_request")
    action_len = info.chunk_size * info.action_dim
    branches = []
    for i, branch in enumerate(request.branches):
        if not branch.state_id:
            raise invalid(f"branches[{i}].state_id is empty")
        if len(branch.actions) != action_len:
            raise invalid(f"branches[{i}].actions has {len(branch.actions)} values, expected chunk_size*action_dim"
                          f" = {info.chunk_size}*{info.action_dim} = {action_len}")
        actions = np.asarray(branch.actions, dtype=np.float32)  # [chunk_size * action_dim]
        if not np.isfinite(actions).all():
            bad = int(np.flatnonzero(~np.isfinite(actions))[0])
            raise invalid(f"branches[{i}].actions[{bad}] is {actions[bad]}; actions must be finite")
        if branch.seed > MAX_SEED:
            raise invalid(f"branches[{i}].seed={branch.seed} is larger than the maximum 2**63-1")
        branches.append(WireBranch(state_id=branch.state_id,
                                   actions=actions.reshape(info.chunk_size, info.action_dim),
                                   seed=int(branch.seed), keep_state=bool(branch.keep_state)))
    return branches


def state_ids_from_proto(state_ids: Sequence[str], field: str = "state_ids") -> list[str]:
    """A non-empty list of distinct, non-empty wire ids."""
    if not state_ids:
        raise invalid(f"{field} is empty; send at least one")
    seen: dict[str, int] = {}
    for i, state_id in enumerate(state_ids):
        if not state_id:
            raise invalid(f"{field}[{i}] is empty")
        if state_id in seen:
            raise invalid(f"{field}[{i}]={state_id!r} repeats {field}[{seen[state_id]}]")
        seen[state_id] = i
    return list(state_ids)
