"""Bearer-token authentication: every call must carry `authorization: Bearer <token>`, else UNAUTHENTICATED.

The health service stays open so that load balancers and orchestrators can probe a server without the
secret; the model service and reflection need the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc import aio

AUTHORIZATION_KEY = "authorization"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_metadata(token: str) -> tuple[str, str]:
    """The metadata entry a client sends (one definition for the server and the tests)."""
    return AUTHORIZATION_KEY, f"Bearer {token}"


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls whose metadata lacks the exact bearer token (compared in constant time)."""

    def __init__(self, token: str, open_prefixes: Iterable[str] = OPEN_SERVICE_PREFIXES) -> None:
        if not token:
            raise ValueError("token must be non-empty")
        self._expected = f"Bearer {token}".encode()
        self._open_prefixes = tuple(open_prefixes)

    def rejection(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """Why a call with this metadata is refused, or None if it carries the token."""
        values = [v for k, v in metadata if k == AUTHORIZATION_KEY]
        if not values:
            return "missing `authorization: Bearer <token>` metadata"
        value = values[0] if isinstance(values[0], bytes) else values[0].encode()
        if not hmac.compare_digest(value, self._expected):
            return "invalid bearer token"
        return None

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open_prefixes):
            return handler
        reason = self.rejection(handler_call_details.invocation_metadata or ())
        return handler if reason is None else _rejecting_handler(handler, reason)


def _rejecting_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED before reading anything."""

    async def reject(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(reject, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
