"""The one metrics helper: Prometheus collectors shared by every service, and a gRPC
interceptor that counts and times every call by method and status code."""
from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("haoping_requests", "gRPC requests handled, by final status code",
                   ["service", "method", "code"])
REQUEST_ERRORS = Counter("haoping_request_errors", "gRPC requests that ended in a non-OK status",
                         ["service", "method", "code"])
REQUEST_DURATION = Histogram("haoping_request_duration_seconds", "gRPC request latency",
                             ["service", "method"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("haoping_requests_in_flight", "gRPC requests being handled", ["service"])
QUEUE_DEPTH = Gauge("haoping_queue_depth", "Requests waiting for a model batch", ["service"])
POLICY_VERSION = Gauge("haoping_policy_version", "Policy version this service holds", ["service"])

# generator
GENERATE_REQUEST_DURATION = Histogram("haoping_generate_request_duration_seconds",
                                      "Generate/GenerateStream latency, queueing included", ["method"],
                                      buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("haoping_generated_tokens", "Response tokens generated")
GENERATED_SAMPLES = Counter("haoping_generated_samples", "Samples generated", ["finish_reason"])
GENERATE_BATCH_SIZE = Histogram("haoping_batch_size", "Items per model batch (generator: rows in the running batch "
                                "at every decode step)", ["service"],
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
WEIGHT_LOAD_DURATION = Histogram("haoping_weight_load_duration_seconds", "Time to fetch and load new weights",
                                 buckets=LATENCY_BUCKETS)
WEIGHT_BYTES = Counter("haoping_weight_transfer_bytes", "Policy weight bytes sent or received", ["direction"])

# scorer
SCORED_TEXTS = Counter("haoping_scored_texts", "Texts scored")
SCORE_VALUE = Histogram("haoping_score", "Scores returned", buckets=tuple(i / 10 for i in range(11)))

# trainer
TRAINER_STAT = Gauge("haoping_trainer_stat", "Latest PPO statistic, named as in TRL", ["stat"])
TRAINER_REWARD_MEAN = Gauge("haoping_trainer_reward_mean", "Mean reward of the latest PPO batch")
TRAINER_KL = Gauge("haoping_trainer_kl_nats", "Mean KL to the reference, nats per sequence, latest batch")
TRAINER_KL_COEF = Gauge("haoping_trainer_kl_coef", "KL penalty coefficient used in the latest batch")
TRAINER_POLICY_LOSS = Gauge("haoping_trainer_policy_loss", "PPO clipped policy loss, latest batch")
TRAINER_VALUE_LOSS = Gauge("haoping_trainer_value_loss", "PPO clipped value loss, latest batch")
TRAINER_STEPS = Counter("haoping_trainer_steps", "PPO steps completed")
TRAINER_NON_FINITE_STEPS = Counter("haoping_trainer_non_finite_steps",
                                   "Steps rolled back because the loss, gradients or weights were non-finite")
TRAINER_REPEATED_STEPS = Counter("haoping_trainer_repeated_steps", "Steps whose id was already applied (answered "
                                 "from the stored response, no second update)")
CHECKPOINTS_SAVED = Counter("haoping_checkpoints_saved", "Verified checkpoints written")
TRAINER_STEP_DURATION = Histogram("haoping_trainer_step_duration_seconds", "PPO step wall time",
                                  buckets=LATENCY_BUCKETS)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics; returns the bound port (port 0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times unary and streaming calls, recording the code the handler set."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self.service

        def observe(context, started, code=None):
            code = code or _code_of(context)
            REQUESTS.labels(service, method, code).inc()
            if code != "OK":
                REQUEST_ERRORS.labels(service, method, code).inc()
            REQUEST_DURATION.labels(service, method).observe(time.perf_counter() - started)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                started = time.perf_counter()
                IN_FLIGHT.labels(service).inc()
                try:
                    response = inner(request, context)
                    observe(context, started)
                    return response
                except Exception as err:
                    observe(context, started, _code_of_exception(context, err))
                    raise
                finally:
                    IN_FLIGHT.labels(service).dec()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                started = time.perf_counter()
                IN_FLIGHT.labels(service).inc()
                try:
                    yield from inner_stream(request, context)
                    observe(context, started)
                except Exception as err:
                    observe(context, started, _code_of_exception(context, err))
                    raise
                finally:
                    IN_FLIGHT.labels(service).dec()

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler


def _code_of(context) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def _code_of_exception(context, err: Exception) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    return "CANCELLED" if isinstance(err, GeneratorExit) else "UNKNOWN"
