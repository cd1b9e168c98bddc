"""Small typed clients for the three services, for the coordinator and for other apps.

    from haoping.client import GeneratorClient
    with GeneratorClient("127.0.0.1:50051") as gen:
        for sample in gen.generate(["刚收到货，感觉"], n=4, seed=1).samples:
            print(sample.full_text)

Every client takes the services' token (``token=`` or ``token_file=``; sent as
``authorization: Bearer <token>`` metadata on every call) and, for TLS, a :class:`TLSFiles`.
"""
from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from haoping.discovery import ReplicaSet
from haoping.log import get_logger
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc

log = get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# grpc's own retry policy: a call that finds the service unreachable is retried with exponential
# backoff and jitter within its deadline (a longer outage is the caller's to handle, e.g. the
# coordinator's supervision). Every haoping RPC is safe to repeat: Step is exactly-once by its id.
# Health checks are not retried: "is it serving now?" wants the answer at once (a replica that is
# down is dropped from the coordinator's set in milliseconds, not after ~1.5 s of retries).
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [
    {"name": [{}],
     "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                     "retryableStatusCodes": ["UNAVAILABLE"]}},
    {"name": [{"service": "grpc.health.v1.Health"}]}]})


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace ignored); ValueError when it is empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS channel. ``ca``: the CA that signed the server's certificate (empty:
    the system's roots); ``cert``/``key``: this client's certificate, for servers started with
    ``--tls-ca`` (mutual TLS); ``server_name``: the name to check in the server's certificate
    when it differs from the host in the address."""
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel. (grpc's call
    credentials do the same but refuse plaintext channels, which loopback and compose use.)"""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def make_channel(address: str, token: str | None = None, tls: TLSFiles | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to a haoping service: TLS when ``tls`` is given, the token on every call."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG),
               # a restarted service is found within a second, not after grpc's default 1-120 s backoff
               ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
    if tls is not None:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


class _Client:
    stub_class = None

    def __init__(self, address: str, timeout: float = 600.0, token: str | None = None,
                 token_file: str | Path | None = None, tls: TLSFiles | None = None):
        self.address = address
        self.timeout = timeout
        if token is None and token_file:
            token = read_token_file(token_file)
        self.channel = make_channel(address, token, tls)
        self.stub = self.stub_class(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def health_status(self, service: str = "") -> str:
        """SERVING / NOT_SERVING / UNKNOWN, or UNAVAILABLE when nothing answers."""
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError:
            return "UNAVAILABLE"

    def wait_serving(self, timeout: float = 300.0, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while self.health_status() != "SERVING":
            if not alive():
                raise RuntimeError(f"service at {self.address} exited before it was serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"service at {self.address} not serving after {timeout:.0f}s")
            time.sleep(0.2)

    def await_serving(self, timeout: float) -> None:
        """Block until the service reports SERVING, through restarts (grpc's wait_for_ready and
        health Watch, no polling); TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                for reply in self.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=left,
                                               wait_for_ready=True):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    break  # DEADLINE_EXCEEDED, or a server without health: stop waiting
        raise TimeoutError(f"service at {self.address} not serving after {timeout:.0f}s")

    def info(self) -> pb.ServiceInfo:
        return self.stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout)


class HealthClient(_Client):
    """Only the standard grpc.health.v1 service, which every haoping service answers."""
    stub_class = health_pb2_grpc.HealthStub


class GeneratorClient(_Client):
    stub_class = pb_grpc.GeneratorStub

    @staticmethod
    def request(prompts: list[str], n: int = 1, max_new_tokens: int | None = None, temperature: float | None = None,
                top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                min_new_tokens: int = 0, first_sample_index: int = 0) -> pb.GenerateRequest:
        request = pb.GenerateRequest(prompts=prompts, samples_per_prompt=n, top_k=top_k, min_new_tokens=min_new_tokens,
                                     first_sample_index=first_sample_index)
        if max_new_tokens is not None:
            request.max_new_tokens = max_new_tokens
        if temperature is not None:
            request.temperature = temperature
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        return request

    def generate(self, prompts: list[str], n: int = 1, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(self.request(prompts, n, **kwargs), timeout=self.timeout)

    def generate_stream(self, prompts: list[str], n: int = 1, **kwargs):
        return self.stub.GenerateStream(self.request(prompts, n, **kwargs), timeout=self.timeout)

    def load_weights(self, trainer_address: str = "", version: int = 0) -> pb.LoadWeightsResponse:
        return self.stub.LoadWeights(pb.LoadWeightsRequest(trainer_address=trainer_address, version=version),
                                     timeout=self.timeout)


def contiguous_shards(n: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of ``parts`` contiguous ranges splitting range(n), the first ``n % parts``
    one longer; empty ranges left out."""
    base, extra = divmod(n, parts)
    plan, first = [], 0
    for i in range(parts):
        count = base + (1 if i < extra else 0)
        if count:
            plan.append((first, count))
        first += count
    return plan


class _Replicas:
    """What both replica groups share: a :class:`haoping.discovery.ReplicaSet` of clients,
    refreshed with ``_admit`` preparing each replica that joins (None: nothing to prepare)."""

    replicas: ReplicaSet
    _admit = None

    @property
    def clients(self) -> list:
        return self.replicas.clients()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.replicas.close()

    def refresh(self) -> tuple[list[str], list[str]]:
        """Re-resolve and health-check the replicas; returns (added, dropped) addresses."""
        return self.replicas.refresh(self._admit)

    def await_members(self, timeout: float) -> None:
        self.replicas.await_members(timeout, self._admit)


class GeneratorReplicas(_Replicas):
    """Several generator replicas behind the two calls the coordinator makes.

    :meth:`generate` splits every prompt's samples across the replicas (a contiguous range of
    sample indices each, sent as ``first_sample_index``), runs the shards concurrently and
    returns one response in the order a single generator would. A sample's seed depends only
    on (seed, prompt index, sample index), so the samples do not depend on the replica count.
    :meth:`load_weights` loads the trainer's policy into every replica.

    The replicas are a :class:`haoping.discovery.ReplicaSet`: a fixed list of clients, or (see
    :meth:`discovered`) addresses found again at every :meth:`refresh`; a replica that joins
    loads the weights the others hold before it gets work.
    """

    def __init__(self, clients: list[GeneratorClient]):
        self.replicas = ReplicaSet.of_clients("generator", clients)
        self._synced: tuple[str, int] | None = None  # (trainer address, version) of the last load_weights

    @classmethod
    def discovered(cls, replicas: ReplicaSet) -> "GeneratorReplicas":
        """Generators found by ``replicas`` (no members until the first :meth:`refresh`)."""
        self = cls.__new__(cls)
        self.replicas, self._synced = replicas, None
        return self

    def _admit(self, client: GeneratorClient) -> bool:
        """A joining replica first loads the version the others hold (none loaded yet: nothing to do)."""
        if self._synced is not None:
            client.load_weights(*self._synced)
        return True

    def shards(self, n: int) -> list[tuple[GeneratorClient, int, int]]:
        """(client, first sample index, samples per prompt) for each replica that gets work."""
        clients = self._members()
        return [(clients[i], first, count) for i, (first, count) in
                enumerate(contiguous_shards(n, len(clients)))]

    def _members(self) -> list[GeneratorClient]:
        clients = self.clients
        if not clients:
            raise NoReplicas(f"no generator is serving at {', '.join(t.text for t in self.replicas.targets)}")
        return clients

    def generate(self, prompts: list[str], n: int = 1, seed: int | None = None, **kwargs) -> pb.GenerateResponse:
        if seed is None:  # one seed for all shards, else each replica would draw its own
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        futures = [self.replicas.pool.submit(client.generate, prompts, count, seed=seed, first_sample_index=first,
                                             **kwargs)
                   for client, first, count in self.shards(n)]
        parts = [future.result() for future in futures]
        samples = sorted((s for part in parts for s in part.samples), key=lambda s: (s.prompt_index, s.sample_index))
        # replicas hold the same version between load_weights calls; if not, report the oldest
        return pb.GenerateResponse(samples=samples, policy_version=min(p.policy_version for p in parts),
                                   seconds=max(p.seconds for p in parts))

    def load_weights(self, trainer_address: str = "", version: int = 0) -> pb.LoadWeightsResponse:
        started = time.perf_counter()
        replies = list(self.replicas.pool.map(lambda client: client.load_weights(trainer_address, version),
                                              self._members()))
        loaded = min(r.policy_version for r in replies)
        self._synced = (trainer_address, loaded)
        return pb.LoadWeightsResponse(policy_version=loaded, bytes=sum(r.bytes for r in replies),
                                      seconds=time.perf_counter() - started,
                                      transport=",".join(sorted({r.transport for r in replies})))


    def mark_synced(self, trainer_address: str, version: int) -> None:
        """Every member holds ``version`` by another way than :meth:`load_weights` (a broadcast):
        a replica that joins later catches up to it."""
        self._synced = (trainer_address, version)


class NoReplicas(RuntimeError):
    """No replica of a role serves (see :meth:`haoping.discovery.ReplicaSet.await_members`)."""


class ScorerClient(_Client):
    stub_class = pb_grpc.ScorerStub

    def score(self, texts: list[str], normalization: int = pb.SCORE_NORMALIZATION_NONE) -> pb.ScoreResponse:
        """``normalization``: SCORE_NORMALIZATION_SIGMOID asks for scores in (0, 1) (see the proto)."""
        return self.stub.Score(pb.ScoreRequest(texts=texts, normalization=normalization), timeout=self.timeout)


class ScorerReplicas(_Replicas):
    """Several scorer replicas behind ``score``: a batch is split into contiguous chunks, one a
    replica, scored concurrently and joined in the batch's order. The replicas are a
    :class:`haoping.discovery.ReplicaSet`, refreshed like :class:`GeneratorReplicas`'."""

    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas

    def score(self, texts: list[str], normalization: int = pb.SCORE_NORMALIZATION_NONE) -> pb.ScoreResponse:
        clients = self.clients
        if not clients:
            raise NoReplicas(f"no scorer is serving at {', '.join(t.text for t in self.replicas.targets)}")
        futures = [self.replicas.pool.submit(client.score, texts[first:first + count], normalization)
                   for client, (first, count) in zip(clients, contiguous_shards(len(texts), len(clients)))]
        parts = [future.result() for future in futures]
        if not parts:  # no texts: one call, for the model id and backend
            return clients[0].score(texts, normalization)
        models = {(p.model_id, p.backend) for p in parts}
        if len(models) > 1:
            log.warning("scorer replicas disagree on the model (%s): one batch was scored by several",
                        sorted(models))
        return pb.ScoreResponse(scores=[score for part in parts for score in part.scores],
                                model_id=parts[0].model_id, backend=parts[0].backend)


class TrainerClient(_Client):
    stub_class = pb_grpc.TrainerStub

    def step(self, rollouts: list[pb.Rollout], min_new_tokens: int | None = None, step_id: str = "") -> pb.StepResponse:
        """One update; ``min_new_tokens``: the EOS minimum the rollouts were sampled with; ``step_id``:
        the trainer applies each id once (a repeated one gets the stored answer)."""
        return self.stub.Step(pb.StepRequest(rollouts=rollouts, min_new_tokens=min_new_tokens, step_id=step_id),
                              timeout=self.timeout)

    def save_checkpoint(self, label: str, coordinator_state: bytes = b"") -> pb.SaveCheckpointResponse:
        """A verified checkpoint named ``label`` inside the trainer's --checkpoint-dir."""
        return self.stub.SaveCheckpoint(pb.SaveCheckpointRequest(label=label, coordinator_state=coordinator_state),
                                        timeout=self.timeout)
