"""Which gRPC status a failed call gets. The one place where engine errors meet status codes.

Decisions (the proto's service comment is the contract):
- `RequestError` is raised by the server's own validation and carries its code.
- `InvalidRequestError` -> INVALID_ARGUMENT, `StateNotFoundError` -> NOT_FOUND.
- `CapacityError` -> RESOURCE_EXHAUSTED. The engine raises it for work that cannot fit: a stream longer
  than the model's context, or a KV cache filled by live states (it preempts running work rather than
  fail, so only held states can exhaust it). Both are the class of an oversize request or message, which
  gRPC itself answers with RESOURCE_EXHAUSTED; the engine's message says what to shrink or release. The
  client library's calls never retry this code; the trainer's rollouts (`trainer.imagination`) start again
  when other clients' held states fill the cache.
- A branch from a state that already holds `max_chunks_per_branch` chunks is OUT_OF_RANGE (the server
  checks it first, so the message names the wire id): rolling past the end of the model's horizon.
"""

from __future__ import annotations

import grpc

from engine.types import CapacityError, EngineError, InvalidRequestError, StateNotFoundError


class RequestError(Exception):
    """A request the server rejects before (or instead of) running it: status code + a precise message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestError({self.code.name}, {self.message!r})"


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for errors that are the caller's fault or a resource limit; None for server bugs."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, StateNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None
