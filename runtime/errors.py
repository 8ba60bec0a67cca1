"""Which gRPC status a failed call gets. The one place where engine errors meet status codes.

Decisions (the proto's service comment is the contract):
- `RequestError` is raised by the server's own validation and carries its code.
- `InvalidRequestError` -> INVALID_ARGUMENT, `StateNotFoundError` -> NOT_FOUND.
- `CapacityError` -> RESOURCE_EXHAUSTED. The engine raises it only for work that can never fit as sent
  (it preempts rather than fail when memory is merely busy), which is the same class of problem as an
  oversize request or an oversize message, and gRPC itself answers those with RESOURCE_EXHAUSTED. The
  message says that the request must be made smaller; the client library never retries this code.
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
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"request can never fit, make it smaller: {exc}"
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None
