"""The generator's weight-broadcast RPCs: a thin adapter over :class:`haoping.weight_broadcast.WeightGroup`.

JoinWeightGroup asks one of this generator's own --trainer-address trainers for the group's
address and a rank (never a request's), then connects; ReceiveWeights takes part in one
broadcast and applies the checks LoadWeights applies, keeping the old weights on a refusal."""
from __future__ import annotations

import argparse
import secrets
import threading
import time

import grpc

from haoping.log import get_logger
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from haoping.weight_broadcast import BroadcastFailed, ReceiveBuffers, WeightGroup, WeightsRefused, client_store
from services.common import metrics
from services.common.batching import ShuttingDown
from services.common.config import add_flag

log = get_logger(__name__)
WILDCARDS = ("", "0.0.0.0", "::", "[::]")
MAX_TIMEOUT_SECONDS = 600.0


def add_weight_group_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--weight-group-host", "",
             help="this generator's own address in a weight group (the trainer and other members connect "
                  "to it); empty: --host, unless that is a wildcard, then what the hostname resolves to")


class GeneratorWeightGroup:
    """JoinWeightGroup and ReceiveWeights for a GeneratorService (its generator, trainer channels, peer check)."""

    def __init__(self, service, args):
        self.service = service
        self.generator = service.generator
        host = args.weight_group_host or args.host
        self.host = "" if host in WILDCARDS else host
        self.member_id = f"generator-{secrets.token_hex(8)}"
        self.group: WeightGroup | None = None
        self._lock = threading.Lock()  # one join or receive at a time
        # what a broadcast may make this generator allocate: its own policy in float32, twice over
        self.max_bytes = 2 * 4 * sum(p.numel() for p in self.generator.model.parameters())
        # weights arrive in the set the model does not serve from and become its parameters in place
        self.buffers = ReceiveBuffers()

    def join(self, request, context) -> pb.WeightGroup:
        if self.service.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "generator is draining")
        address = self.service._allowed_peer(request.trainer_address, context)
        try:
            group = pb_grpc.TrainerStub(self.service._trainer_channel(address)).JoinWeightGroup(
                pb.JoinWeightGroupRequest(group_id=request.group_id, member_id=self.member_id), timeout=30)
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                code = grpc.StatusCode.FAILED_PRECONDITION  # the trainer refused this generator's token
            context.abort(code, f"joining the weight group of {address}: {err.details()}")
        timeout = min(max(group.timeout_seconds, 1.0), MAX_TIMEOUT_SECONDS)
        device = self.generator.device if group.backend == "nccl" else "cpu"
        with self._lock:
            self.group = None  # a new group replaces the old one, joined or not
            started = time.perf_counter()
            try:
                store = client_store(group.address, group.port, timeout)
                self.group = WeightGroup(store, group.group_id, group.rank, group.world_size, self.host, timeout,
                                         device)
                if self.buffers.device != self.group.device:
                    self.buffers = ReceiveBuffers(self.group.device)
            except (BroadcastFailed, RuntimeError) as err:  # RuntimeError: the store did not answer
                metrics.WEIGHT_BROADCASTS.labels("failed").inc()
                context.abort(grpc.StatusCode.ABORTED, f"weight group {group.group_id}: cannot connect to "
                              f"{group.address}:{group.port}: {str(err).splitlines()[0][:300]}")
        log.info("joined weight group %s as rank %d of %d (%.2fs)", group.group_id, group.rank, group.world_size,
                 time.perf_counter() - started)
        return group

    def receive(self, request, context) -> pb.LoadWeightsResponse:
        if self.service.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "generator is draining")
        with self._lock:
            group = self.group
            if group is None or group.group_id != request.group_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"group_id: this generator is not in weight group {request.group_id[:40]!r}; "
                              "JoinWeightGroup first")
            started = time.perf_counter()
            try:
                # the check and the swap are model work: on the batcher's thread (see run_when_idle)
                run = self.service.batcher.run_when_idle
                version, state = group.receive(
                    lambda tensors, version: run(lambda: self.generator.check_state(tensors, version)),
                    self.max_bytes, into=lambda sizes: self.buffers.spare(sizes, self.generator.model.parameters()))
                swap_started = time.perf_counter()
                run(lambda: self.generator.swap_in(state, version, adopt=True))
                group.last_phases["swap"] = time.perf_counter() - swap_started
            except WeightsRefused as err:
                self._refused(err)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            except ValueError as err:  # a newer version was loaded meanwhile
                self._refused(err)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            except ShuttingDown as err:  # mid-broadcast: this group is done for
                self.group = None
                context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            except BroadcastFailed as err:
                self.group = None
                metrics.WEIGHT_BROADCASTS.labels("failed").inc()
                log.warning("weight broadcast failed: %s; version %d keeps serving", err, self.generator.version)
                context.abort(grpc.StatusCode.ABORTED, f"weight broadcast failed: {err}")
        seconds = time.perf_counter() - started
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        metrics.WEIGHT_BROADCASTS.labels("ok").inc()
        metrics.WEIGHT_LOAD_DURATION.observe(seconds)
        metrics.WEIGHT_BYTES.labels("received").inc(nbytes)
        metrics.POLICY_VERSION.labels("generator").set(self.generator.version)
        log.info("received policy version %d by broadcast (%.1f MB in %.2fs)", version, nbytes / 1e6, seconds)
        return pb.LoadWeightsResponse(policy_version=self.generator.version, bytes=nbytes, seconds=seconds,
                                      phase_seconds=group.last_phases, transport="broadcast")

    def _refused(self, err: Exception) -> None:
        metrics.WEIGHT_BROADCASTS.labels("refused").inc()
        metrics.WEIGHT_LOADS_REFUSED.labels("unfit").inc()
        log.warning("refused broadcast weights: %s; version %d keeps serving", err, self.generator.version)
