"""Client of the rollout server: numpy in, numpy out, over the generated gRPC stubs only.

    with WorldModelClient("127.0.0.1:50051") as client:
        info = client.model_info()
        ids = client.create_states(["pick up the cube"], [{"head": head_rgb, "wrist": wrist_rgb}])
        for result in client.imagine(ids * 16, actions, seeds=range(16), keep_state=True):
            ...  # results arrive as branches finish; result.index is the branch's position
        client.release([r.state_id for r in kept] + ids)

Calls that fail with UNAVAILABLE (server not up yet, restarting, connection dropped) are retried with
exponential backoff; an Imagine is retried only if no result had arrived yet. Every other status is
raised at once as `RolloutServerError` with the server's message. `timeout` is the per-attempt deadline
of the unary calls; an Imagine stream has no deadline unless `imagine_timeout` (or the call's `timeout`)
sets one, since a large request legitimately streams for minutes on a CPU: close its iterator to cancel.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from protos.vla_mbpo.v1 import world_model_pb2 as pb
from protos.vla_mbpo.v1 import world_model_pb2_grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


class RolloutServerError(Exception):
    """A call the server (or the channel) failed; `code` is the gRPC status, the message says why."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed with {code.name}{tries}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE: attempt k waits min(initial * multiplier**k, max) * (1 +- jitter)."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(f"need 0 < initial_backoff <= max_backoff, got {self.initial_backoff}, "
                             f"{self.max_backoff}")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"need multiplier >= 1 and jitter in [0, 1), got {self.multiplier}, {self.jitter}")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        base = min(self.initial_backoff * self.multiplier**retry, self.max_backoff)
        return base * (1 + self.jitter * (2 * rng.random() - 1))


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ServerModelInfo:
    """What the served world model expects and produces."""

    views: tuple[str, ...]
    image_height: int
    image_width: int
    chunk_size: int
    action_dim: int
    action_low: np.ndarray  # [action_dim] float32
    action_high: np.ndarray  # [action_dim] float32
    tokens_per_view: int
    max_chunks_per_branch: int
    model_name: str
    model_version: str
    max_states_per_request: int
    max_branches_per_request: int


@dataclass(frozen=True)
class ImaginedBranch:
    """One finished branch. `index` is its position in the imagine() call."""

    index: int
    state_id: str | None  # the new state when keep_state was set
    success_prob: float
    success: bool
    tokens: np.ndarray | None  # [num_views, tokens_per_view] image codes when return_tokens
    images: dict[str, np.ndarray] | None  # view -> uint8 [H, W, 3] when return_images


@dataclass(frozen=True)
class ServerStats:
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    live_states: int
    queue_depth: int
    tokens_generated: int
    prefix_cache_hit_rate: float
    branches_completed: int
    tokens_per_second: float


class WorldModelClient:
    """A blocking client of one rollout server. Thread-safe like the underlying gRPC channel."""

    def __init__(self, target: str, token: str | None = None, timeout: float | None = 300.0,
                 imagine_timeout: float | None = None, retry: RetryPolicy = RetryPolicy(), client_id: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, server_name: str | None = None,
                 max_message_mb: int = 256, seed: int = 0) -> None:
        """`token`: bearer token; `client_id`: sent as x-client-id (the server charges states to it, else to
        this host); TLS when `tls` or `root_certificates` is given (`server_name` overrides the name the
        certificate is checked against)."""
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_mb * 1024 * 1024),
                                          ("grpc.max_send_message_length", max_message_mb * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = world_model_pb2_grpc.WorldModelStub(self._channel)
        self._metadata: list[tuple[str, str]] = []
        if token is not None:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if client_id is not None:
            self._metadata.append(("x-client-id", client_id))
        self.target = target
        self.timeout = timeout
        self.imagine_timeout = imagine_timeout
        self.retry = retry
        self._rng = random.Random(seed)
        self._info: ServerModelInfo | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorldModelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the channel is connected; raises TimeoutError naming the target otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"rollout server at {self.target} not reachable within {timeout}s") from None

    # ---- RPCs -------------------------------------------------------------------------------------
    def model_info(self, refresh: bool = False) -> ServerModelInfo:
        """The served model's facts (cached after the first call)."""
        if self._info is None or refresh:
            msg = self._unary("GetModelInfo", self._stub.GetModelInfo, pb.GetModelInfoRequest(), None)
            self._info = ServerModelInfo(
                views=tuple(msg.views), image_height=msg.image_height, image_width=msg.image_width,
                chunk_size=msg.chunk_size, action_dim=msg.action_dim,
                action_low=np.asarray(msg.action_low, dtype=np.float32),
                action_high=np.asarray(msg.action_high, dtype=np.float32), tokens_per_view=msg.tokens_per_view,
                max_chunks_per_branch=msg.max_chunks_per_branch, model_name=msg.model_name,
                model_version=msg.model_version, max_states_per_request=msg.max_states_per_request,
                max_branches_per_request=msg.max_branches_per_request)
        return self._info

    def create_states(self, instructions: Sequence[str], observations: Sequence[Mapping[str, np.ndarray]],
                      timeout: float | None = None) -> list[str]:
        """One state per (instruction, observation); an observation maps view -> uint8 [H, W, 3]."""
        if len(instructions) != len(observations):
            raise ValueError(f"{len(instructions)} instructions but {len(observations)} observations")
        request = pb.CreateStatesRequest()
        for i, (instruction, observation) in enumerate(zip(instructions, observations, strict=True)):
            state = request.states.add(instruction=instruction)
            for view, image in observation.items():
                state.observation.images.append(encode_image(view, image, f"observations[{i}][{view!r}]"))
        return list(self._unary("CreateStates", self._stub.CreateStates, request, timeout).state_ids)

    def imagine(self, state_ids: Sequence[str], actions: np.ndarray, seeds: Iterable[int] | None = None,
                keep_state: bool | Sequence[bool] = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, return_images: bool = False, return_tokens: bool = False,
                timeout: float | None = None) -> Iterator[ImaginedBranch]:
        """Rolls each state forward by its action chunk; yields results in the order branches finish.

        actions: float [num_branches, chunk_size, action_dim]; seeds default to 0..num_branches-1.
        Closing the iterator early (break, garbage collection) cancels the call on the server.
        """
        request = self._imagine_request(state_ids, actions, seeds, keep_state, temperature, top_k, top_p,
                                        return_images, return_tokens)
        tokens_per_view = self.model_info().tokens_per_view if return_tokens else 0
        return self._imagine_stream(request, self.imagine_timeout if timeout is None else timeout, tokens_per_view)

    def release(self, state_ids: Sequence[str], timeout: float | None = None) -> int:
        """Releases states (atomic: an unknown id releases nothing); returns how many."""
        request = pb.ReleaseStatesRequest(state_ids=list(state_ids))
        return self._unary("ReleaseStates", self._stub.ReleaseStates, request, timeout).num_released

    def stats(self, timeout: float | None = None) -> ServerStats:
        msg = self._unary("GetStats", self._stub.GetStats, pb.GetStatsRequest(), timeout)
        return ServerStats(
            kv_blocks_total=msg.kv_blocks_total, kv_blocks_used=msg.kv_blocks_used,
            kv_blocks_cached=msg.kv_blocks_cached, live_states=msg.live_states, queue_depth=msg.queue_depth,
            tokens_generated=msg.tokens_generated, prefix_cache_hit_rate=msg.prefix_cache_hit_rate,
            branches_completed=msg.branches_completed, tokens_per_second=msg.tokens_per_second)

    # ---- helpers ----------------------------------------------------------------------------------
    def _imagine_request(self, state_ids: Sequence[str], actions: np.ndarray, seeds: Iterable[int] | None,
                         keep_state: bool | Sequence[bool], temperature: float, top_k: int, top_p: float,
                         return_images: bool, return_tokens: bool) -> pb.ImagineRequest:
        actions = np.asarray(actions, dtype=np.float32)  # [num_branches, chunk_size, action_dim]
        num = len(state_ids)
        if actions.ndim != 3 or actions.shape[0] != num:
            raise ValueError(f"actions must be [num_branches={num}, chunk_size, action_dim], got {actions.shape}")
        seed_list = list(range(num)) if seeds is None else [int(s) for s in seeds]
        keep_list = [bool(keep_state)] * num if isinstance(keep_state, bool | np.bool_) else list(keep_state)
        if len(seed_list) != num or len(keep_list) != num:
            raise ValueError(f"need one seed and one keep_state per branch ({num}), got {len(seed_list)} seeds "
                             f"and {len(keep_list)} keep_state values")
        request = pb.ImagineRequest(
            sampling=pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
            return_images=return_images, return_tokens=return_tokens)
        flat = actions.reshape(num, -1).tolist()
        for state_id, row, seed, keep in zip(state_ids, flat, seed_list, keep_list, strict=True):
            request.branches.add(state_id=state_id, actions=row, seed=seed, keep_state=keep)
        return request

    def _imagine_stream(self, request: pb.ImagineRequest, timeout: float | None,
                        tokens_per_view: int) -> Iterator[ImaginedBranch]:
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.Imagine(request, timeout=timeout, metadata=self._metadata)
            received = 0
            try:
                for msg in call:
                    received += 1
                    yield decode_result(msg, tokens_per_view)
                return
            except grpc.RpcError as exc:
                if received == 0 and self._should_retry(exc, attempt):
                    continue
                raise RolloutServerError("Imagine", exc.code(), exc.details() or "", attempt) from None
            finally:
                call.cancel()  # no-op after the stream ended; stops the server's work if we stopped early

    def _unary(self, method: str, fn: Any, request: Any, timeout: float | None) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(request, timeout=self._deadline(timeout), metadata=self._metadata)
            except grpc.RpcError as exc:
                if self._should_retry(exc, attempt):
                    continue
                raise RolloutServerError(method, exc.code(), exc.details() or "", attempt) from None

    def _should_retry(self, exc: grpc.RpcError, attempt: int) -> bool:
        if exc.code() not in RETRYABLE_CODES or attempt >= self.retry.max_attempts:
            return False
        time.sleep(self.retry.backoff(attempt - 1, self._rng))
        return True

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def encode_image(view: str, image: np.ndarray, where: str = "image") -> pb.Image:
    """uint8 [H, W, 3] -> Image; ValueError naming `where` for any other dtype or shape."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where} must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    return pb.Image(view=view, height=image.shape[0], width=image.shape[1],
                    rgb=np.ascontiguousarray(image).tobytes())


def decode_result(msg: pb.ImagineResult, tokens_per_view: int) -> ImaginedBranch:
    tokens = None
    if tokens_per_view and msg.tokens:
        tokens = np.asarray(msg.tokens, dtype=np.int64).reshape(-1, tokens_per_view)  # [num_views, tokens_per_view]
    images = None
    if msg.HasField("observation"):
        images = {img.view: np.frombuffer(img.rgb, dtype=np.uint8).reshape(img.height, img.width, 3)
                  for img in msg.observation.images}
    return ImaginedBranch(index=msg.index, state_id=msg.state_id or None, success_prob=msg.success_prob,
                          success=msg.success, tokens=tokens, images=images)
