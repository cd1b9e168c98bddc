"""The trainer's weight-broadcast RPCs: a thin adapter over :class:`haoping.weight_broadcast.WeightGroupHost`.

The group's address and port are this trainer's flags, never a request's; the RPCs take the
token like every state-changing one (services/common/interceptors.py)."""
from __future__ import annotations

import argparse
import re
import threading

import grpc

from haoping.log import get_logger
from haoping.v1 import haoping_pb2 as pb
from haoping.weight_broadcast import BroadcastFailed, GroupFull, WeightGroupHost
from services.common import metrics
from services.common.config import add_flag

log = get_logger(__name__)
MEMBER_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GROUP_ID = re.compile(r"[0-9a-f]{32}")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def positive(kind):
    """An argparse type: ``kind`` above 0 (argparse then exits 2 naming the flag otherwise)."""
    def parse(raw: str):
        value = kind(raw)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {raw}")
        return value
    parse.__name__ = kind.__name__
    return parse


def port_number(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {raw}")
    return value


def add_weight_group_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--weight-group-address", "",
             help="address generators reach this trainer's weight group on (its TCPStore listens there and "
                  "only there; empty: --host, unless that is a wildcard, then broadcast is off)")
    add_flag(parser, "--weight-group-port", 29510, port_number, "TCPStore port of the weight group (0 picks a free one)")
    add_flag(parser, "--weight-group-timeout", 60.0, positive(float),
             "seconds the weight group's rendezvous and each of its collectives may take; a member that "
             "died or hangs fails the broadcast after at most this long")
    add_flag(parser, "--weight-bucket-mb", 128, positive(int), "size of the flat buffers the policy is broadcast in")
    add_flag(parser, "--max-weight-group-generators", 64, positive(int), "most generators in one weight group")


class TrainerWeightGroups:
    """OpenWeightGroup, JoinWeightGroup, BroadcastWeights for a TrainerService (its lock, trainer and
    compute thread)."""

    def __init__(self, trainer, lock: threading.Lock, args, compute):
        self.trainer, self._lock, self.compute = trainer, lock, compute
        address = args.weight_group_address or args.host
        self.address = "" if address in WILDCARDS else address
        self.host = WeightGroupHost(self.address, args.weight_group_port, args.weight_group_timeout,
                                    args.weight_bucket_mb << 20, args.max_weight_group_generators,
                                    next(trainer.model.lm.parameters()).device)
        self.limits = {"max_weight_group_generators": args.max_weight_group_generators,
                       "weight_bucket_bytes": args.weight_bucket_mb << 20,
                       "weight_group_timeout_seconds": int(args.weight_group_timeout)}

    def _message(self, group, rank: int) -> pb.WeightGroup:
        return pb.WeightGroup(group_id=group.group_id, address=self.address, port=self.host.port,
                              world_size=group.world, rank=rank, policy_version=self.trainer.version,
                              timeout_seconds=self.host.timeout,
                              backend="nccl" if self.host.device.type == "cuda" else "gloo")

    def open(self, request, context) -> pb.WeightGroup:
        if not self.address:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "weight broadcast is off: start the trainer with --weight-group-address (an address "
                          "the generators reach it on); meanwhile generators pull with LoadWeights")
        try:
            group = self.host.open(request.generators)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"generators: {err}")
        except OSError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"cannot listen on --weight-group-address/--weight-group-port "
                          f"{self.address}:{self.host.requested_port}: {err}")
        log.info("weight group %s opened for %d generators on %s:%d", group.group_id, group.world - 1,
                 self.address, self.host.port)
        return self._message(group, 0)

    def join(self, request, context) -> pb.WeightGroup:
        if not GROUP_ID.fullmatch(request.group_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "group_id must be the 32 hex digits OpenWeightGroup gave")
        if not MEMBER_ID.fullmatch(request.member_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "member_id must match [A-Za-z0-9._:-]{1,128}")
        try:
            group, rank = self.host.join(request.group_id, request.member_id)
        except GroupFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, f"group_id: {err}")
        return self._message(group, rank)

    def broadcast(self, request, context) -> pb.BroadcastWeightsResponse:
        if not GROUP_ID.fullmatch(request.group_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "group_id must be the 32 hex digits OpenWeightGroup gave")
        with self._lock:  # no update while the weights are on the wire
            version = self.trainer.version
            try:
                if request.version and request.version != version:
                    problem = f"policy version {request.version} is not available; the trainer holds {version}"
                    self.host.cancel(request.group_id, version, problem)  # the members stop waiting
                    context.abort(grpc.StatusCode.NOT_FOUND, problem)
                # the parameters where they are (on the GPU for NCCL), not policy_state's host copies
                report = self.compute.run(lambda: self.host.broadcast(request.group_id, version,
                                                                      self.trainer.policy_tensors()))
            except LookupError as err:
                context.abort(grpc.StatusCode.NOT_FOUND, f"group_id: {err}")
            except BroadcastFailed as err:
                metrics.WEIGHT_BROADCASTS.labels("failed").inc()
                log.warning("weight broadcast of version %d failed: %s", version, err)
                context.abort(grpc.StatusCode.ABORTED, f"weight broadcast failed: {err}")
        metrics.WEIGHT_BROADCASTS.labels("refused" if report.refused_ranks else "ok").inc()
        metrics.WEIGHT_BYTES.labels("sent").inc(report.bytes * report.receivers)
        log.info("broadcast policy version %d (%.1f MB in %.2fs%s)", version, report.bytes / 1e6, report.seconds,
                 f"; refused by ranks {report.refused_ranks}" if report.refused_ranks else "")
        return pb.BroadcastWeightsResponse(policy_version=version, bytes=report.bytes, seconds=report.seconds,
                                           refused_ranks=report.refused_ranks, phase_seconds=report.phases)

