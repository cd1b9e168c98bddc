"""The one metrics helper: Prometheus collectors, and the /metrics server.

Collectors every service uses are registered at import. Each service's own collectors are
created unregistered and exported only by that service (:func:`start_metrics_server` registers
them), so the generator does not export the trainer's gauges. The interceptor that counts every
call is :class:`services.common.interceptors.MetricsInterceptor`."""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# every service
REQUESTS = Counter("haoping_requests", "gRPC requests handled, by final status code",
                   ["service", "method", "code"])
REQUEST_ERRORS = Counter("haoping_request_errors", "gRPC requests that ended in a non-OK status",
                         ["service", "method", "code"])
REQUEST_DURATION = Histogram("haoping_request_duration_seconds", "gRPC request latency",
                             ["service", "method"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("haoping_requests_in_flight", "gRPC requests being handled", ["service"])
AUTH_FAILURES = Counter("haoping_auth_failures", "Calls refused for a missing, wrong or unconfigured token",
                        ["service", "method", "reason"])
INTERNAL_ERRORS = Counter("haoping_internal_errors", "Calls that failed unexpectedly (INTERNAL, request id logged)",
                          ["service", "method"])
QUEUE_DEPTH = Gauge("haoping_queue_depth", "Requests waiting for a model batch", ["service"])
POLICY_VERSION = Gauge("haoping_policy_version", "Policy version this service holds", ["service"])
GENERATE_BATCH_SIZE = Histogram("haoping_batch_size", "Items per model batch (generator: rows in the running batch "
                                "at every decode step)", ["service"],
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
WEIGHT_BYTES = Counter("haoping_weight_transfer_bytes", "Policy weight bytes sent or received over gRPC, or "
                       "filed (written into --local-weights-dir for a co-located generator) and read from there", ["direction"])
WEIGHT_BROADCASTS = Counter("haoping_weight_broadcasts", "Weight broadcasts this service took part in (trainer: "
                            "sent; generator: received), by outcome: ok, refused (a receiver's checks refused "
                            "the weights; the old ones keep serving) or failed (a member died or timed out)",
                            ["outcome"])

# generator
GENERATE_REQUEST_DURATION = Histogram("haoping_generate_request_duration_seconds",
                                      "Generate/GenerateStream latency, queueing included", ["method"],
                                      buckets=LATENCY_BUCKETS, registry=None)
GENERATED_TOKENS = Counter("haoping_generated_tokens", "Response tokens generated", registry=None)
GENERATED_SAMPLES = Counter("haoping_generated_samples", "Samples generated", ["finish_reason"], registry=None)
QUEUED_WORK_TOKENS = Gauge("haoping_queued_work_tokens", "Work admitted and not yet answered (samples x "
                           "max_new_tokens)", registry=None)
WEIGHT_LOAD_DURATION = Histogram("haoping_weight_load_duration_seconds", "Time to fetch and load new weights",
                                 buckets=LATENCY_BUCKETS, registry=None)
WEIGHT_LOADS_REFUSED = Counter("haoping_weight_loads_refused", "LoadWeights refused (peer not allowed, weights "
                               "that do not fit, non-finite, or older); the old weights kept serving",
                               ["reason"], registry=None)

# scorer
SCORED_TEXTS = Counter("haoping_scored_texts", "Texts scored", registry=None)
SCORE_VALUE = Histogram("haoping_score", "Scores returned", buckets=tuple(i / 10 for i in range(11)), registry=None)

# trainer
TRAINER_STAT = Gauge("haoping_trainer_stat", "Latest PPO statistic, named as in TRL", ["stat"], registry=None)
TRAINER_REWARD_MEAN = Gauge("haoping_trainer_reward_mean", "Mean reward of the latest PPO batch", registry=None)
TRAINER_KL = Gauge("haoping_trainer_kl_nats", "Mean KL to the reference, nats per sequence, latest batch",
                   registry=None)
TRAINER_KL_COEF = Gauge("haoping_trainer_kl_coef", "KL penalty coefficient used in the latest batch", registry=None)
TRAINER_POLICY_LOSS = Gauge("haoping_trainer_policy_loss", "PPO clipped policy loss, latest batch", registry=None)
TRAINER_VALUE_LOSS = Gauge("haoping_trainer_value_loss", "PPO clipped value loss, latest batch", registry=None)
TRAINER_STEPS = Counter("haoping_trainer_steps", "PPO steps completed", registry=None)
TRAINER_NON_FINITE_STEPS = Counter("haoping_trainer_non_finite_steps",
                                   "Steps rolled back because the loss, gradients or weights were non-finite",
                                   registry=None)
TRAINER_REPEATED_STEPS = Counter("haoping_trainer_repeated_steps", "Steps whose id was already applied (answered "
                                 "from the stored response, no second update)", registry=None)
CHECKPOINTS_SAVED = Counter("haoping_checkpoints_saved", "Verified checkpoints written", registry=None)
TRAINER_STEP_DURATION = Histogram("haoping_trainer_step_duration_seconds", "PPO step wall time",
                                  buckets=LATENCY_BUCKETS, registry=None)

# coordinator (haoping run --metrics-address)
REPLICAS = Gauge("haoping_replicas", "Replicas the coordinator uses now (resolved and SERVING), by role", ["role"],
                 registry=None)
REPLICAS_ADDED = Counter("haoping_replicas_added", "Replicas that joined the coordinator's set, by role", ["role"],
                         registry=None)
REPLICAS_DROPPED = Counter("haoping_replicas_dropped", "Replicas dropped from the coordinator's set (no longer "
                           "resolved, or not SERVING), by role", ["role"], registry=None)

SERVICE_COLLECTORS = {
    "generator": (GENERATE_REQUEST_DURATION, GENERATED_TOKENS, GENERATED_SAMPLES, QUEUED_WORK_TOKENS,
                  WEIGHT_LOAD_DURATION, WEIGHT_LOADS_REFUSED),
    "scorer": (SCORED_TEXTS, SCORE_VALUE),
    "trainer": (TRAINER_STAT, TRAINER_REWARD_MEAN, TRAINER_KL, TRAINER_KL_COEF, TRAINER_POLICY_LOSS,
                TRAINER_VALUE_LOSS, TRAINER_STEPS, TRAINER_STEP_DURATION, TRAINER_NON_FINITE_STEPS,
                TRAINER_REPEATED_STEPS, CHECKPOINTS_SAVED),
    "coordinator": (REPLICAS, REPLICAS_ADDED, REPLICAS_DROPPED),
}


_registered: set[str] = set()


def register_service_collectors(service: str) -> None:
    """Export ``service``'s own collectors from this process (once)."""
    if service in _registered:
        return
    for collector in SERVICE_COLLECTORS.get(service, ()):
        REGISTRY.register(collector)
    _registered.add(service)


def start_metrics_server(host: str, port: int, service: str) -> int:
    """Serve /metrics with the shared and ``service``'s collectors; returns the bound port (0 picks one)."""
    register_service_collectors(service)
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
