"""The server interceptors every service runs, outermost first:

* :class:`MetricsInterceptor` counts and times every call by method and final status code;
* :class:`ErrorInterceptor` turns anything a handler did not map itself into INTERNAL with a
  request id (logged with the traceback, counted), so a caller never sees UNKNOWN or a traceback;
* :class:`AuthInterceptor` checks ``authorization: Bearer <token>`` on the protected methods.

All three wrap a handler the same way for unary and streaming calls: :func:`wrap_handler`.
"""
from __future__ import annotations

import hmac
import secrets
import time
from contextlib import contextmanager
from typing import Callable, ContextManager

import grpc

from haoping.log import get_logger
from services.common import metrics

log = get_logger(__name__)

_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler,
              (True, True): grpc.stream_stream_rpc_method_handler}


def wrap_handler(handler: grpc.RpcMethodHandler,
                 around: Callable[[grpc.ServicerContext], ContextManager]) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run inside ``around(context)``, for every kind of call:
    a streaming response is consumed inside it, so the context manager sees the whole call."""
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        def behaviour(request, context):
            with around(context):
                yield from inner(request, context)
    else:
        inner = handler.unary_unary or handler.stream_unary

        def behaviour(request, context):
            with around(context):
                return inner(request, context)

    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def method_name(handler_call_details) -> str:
    return handler_call_details.method.rsplit("/", 1)[-1]


def status_of(context) -> grpc.StatusCode | None:
    """The code a handler set (abort or set_code), None while it set none."""
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times unary and streaming calls, recording the code the handler set."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = self.service, method_name(handler_call_details)

        @contextmanager
        def observed(context):
            started = time.perf_counter()
            metrics.IN_FLIGHT.labels(service).inc()
            failed: BaseException | None = None
            try:
                yield
            except BaseException as err:  # GeneratorExit: the caller left a stream
                failed = err
                raise
            finally:
                metrics.IN_FLIGHT.labels(service).dec()
                code = status_of(context)
                if code is None or (failed is not None and code == grpc.StatusCode.OK):
                    code = grpc.StatusCode.OK if failed is None else (
                        grpc.StatusCode.CANCELLED if isinstance(failed, GeneratorExit) else grpc.StatusCode.INTERNAL)
                metrics.REQUESTS.labels(service, method, code.name).inc()
                if code != grpc.StatusCode.OK:
                    metrics.REQUEST_ERRORS.labels(service, method, code.name).inc()
                metrics.REQUEST_DURATION.labels(service, method).observe(time.perf_counter() - started)

        return wrap_handler(handler, observed)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Anything a handler raises without having set a status becomes INTERNAL with a short
    message and a request id; the traceback goes to the log under that id, and it is counted."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = self.service, method_name(handler_call_details)

        @contextmanager
        def internal_on_unexpected(context):
            try:
                yield
            except Exception:
                if status_of(context) not in (None, grpc.StatusCode.OK):
                    raise  # the handler chose its status (context.abort)
                request_id = secrets.token_hex(8)
                log.exception("%s/%s failed, request id %s", service, method, request_id)
                metrics.INTERNAL_ERRORS.labels(service, method).inc()
                context.set_trailing_metadata((("haoping-request-id", request_id),))
                context.abort(grpc.StatusCode.INTERNAL,
                              f"internal error in {method} (request id {request_id}; the {service} log has details)")

        return wrap_handler(handler, internal_on_unexpected)


# Reads: open unless --require-token-for-reads. Health and reflection: always open (probes and
# grpcurl need them; they reveal no data). Every other method, present or future, needs the token.
READ_METHODS = frozenset({"/haoping.v1.Generator/Generate", "/haoping.v1.Generator/GenerateStream",
                          "/haoping.v1.Generator/GetInfo", "/haoping.v1.Scorer/Score",
                          "/haoping.v1.Scorer/GetInfo", "/haoping.v1.Trainer/GetInfo"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
HOW_TO_CONFIGURE = ("start the service with --auth-token-file FILE (env HAOPING_AUTH_TOKEN_FILE) holding a "
                    "random token, and call with 'authorization: Bearer <token>' metadata; or pass "
                    "--insecure-no-auth to serve it without a token")


def needs_token(method: str, require_for_reads: bool) -> bool:
    if method.startswith(OPEN_PREFIXES):
        return False
    return require_for_reads or method not in READ_METHODS


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """One check for every protected method: the bearer token, compared in constant time.

    ``token`` None (no token file) refuses the protected methods with PERMISSION_DENIED, saying
    how to configure one, unless ``insecure`` (--insecure-no-auth) serves them open."""

    def __init__(self, service: str, token: str | None, require_for_reads: bool = False, insecure: bool = False):
        self.service = service
        self._token = token.encode() if token is not None else None
        self.require_for_reads = require_for_reads
        self.insecure = insecure

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self.insecure or not needs_token(handler_call_details.method, self.require_for_reads):
            return handler
        method = method_name(handler_call_details)
        if self._token is None:
            return self._refuse(handler, method, "unconfigured", grpc.StatusCode.PERMISSION_DENIED,
                                f"{method} needs a token but this {self.service} has none: {HOW_TO_CONFIGURE}")
        presented = bearer_token(handler_call_details.invocation_metadata)
        if presented is None:
            return self._refuse(handler, method, "missing", grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} needs 'authorization: Bearer <token>' metadata (the token in the "
                                "services' --auth-token-file)")
        if not hmac.compare_digest(presented.encode(), self._token):
            return self._refuse(handler, method, "wrong", grpc.StatusCode.UNAUTHENTICATED,
                                f"{method}: the bearer token does not match this {self.service}'s token")
        return handler

    def _refuse(self, handler, method: str, reason: str, code: grpc.StatusCode, message: str):
        metrics.AUTH_FAILURES.labels(self.service, method, reason).inc()

        @contextmanager
        def refused(context):
            context.abort(code, message)
            yield  # never reached: abort raises

        return wrap_handler(handler, refused)
