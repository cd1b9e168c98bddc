"""The coordinator's weight sync by broadcast (``haoping run --weight-sync broadcast``).

A weight group of the trainer and the current generators is opened (Trainer.OpenWeightGroup),
every generator joins it (Generator.JoinWeightGroup, which asks its own trainer for the address),
and each sync is one Trainer.BroadcastWeights beside one Generator.ReceiveWeights per generator.
The group is opened again when the generators change or after any failure; the caller falls
back to the pull (LoadWeights) when :meth:`BroadcastSync.sync` raises."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from haoping.client import GeneratorClient, TrainerClient
from haoping.log import get_logger
from haoping.v1 import haoping_pb2 as pb

log = get_logger(__name__)


class BroadcastSync:
    def __init__(self, trainer: TrainerClient, trainer_address: str):
        self.trainer, self.trainer_address = trainer, trainer_address
        self.group_id: str | None = None
        self.members: list[str] = []

    def _call_all(self, trainer_call, generator_calls) -> list:
        """Run the trainer's call beside every generator's (a collective needs them all at once);
        the first error after all of them ended, or their results (the trainer's first)."""
        with ThreadPoolExecutor(len(generator_calls) + 1, thread_name_prefix="weight-sync") as pool:
            futures = [pool.submit(trainer_call)] + [pool.submit(call) for call in generator_calls]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def _open(self, generators: list[GeneratorClient]) -> None:
        self.group_id = None
        started = time.perf_counter()
        opened = self.trainer.stub.OpenWeightGroup(pb.OpenWeightGroupRequest(generators=len(generators)),
                                                   timeout=self.trainer.timeout)
        join = pb.GeneratorJoinWeightGroupRequest(group_id=opened.group_id, trainer_address=self.trainer_address)
        # the trainer's own rank connects in the background; the joins return once all are connected
        self._call_all(lambda: None, [lambda g=g: g.stub.JoinWeightGroup(join, timeout=g.timeout) for g in generators])
        self.group_id, self.members = opened.group_id, [g.address for g in generators]
        log.info("weight group %s: the trainer and %d generator(s) on %s:%d (%.2fs)", opened.group_id,
                 len(generators), opened.address, opened.port, time.perf_counter() - started)

    def sync(self, generators: list[GeneratorClient], version: int = 0) -> pb.LoadWeightsResponse:
        """Every generator at the trainer's ``version`` (0: its latest) by one broadcast;
        grpc.RpcError (the group dropped) when any part failed or a generator refused."""
        started = time.perf_counter()
        try:
            if self.group_id is None or self.members != [g.address for g in generators]:
                self._open(generators)
            receive = pb.ReceiveWeightsRequest(group_id=self.group_id)
            sent, *received = self._call_all(
                lambda: self.trainer.stub.BroadcastWeights(
                    pb.BroadcastWeightsRequest(group_id=self.group_id, version=version), timeout=self.trainer.timeout),
                [lambda g=g: g.stub.ReceiveWeights(receive, timeout=g.timeout) for g in generators])
        except grpc.RpcError:
            self.group_id = None
            raise
        # where the time went: the trainer's phases, and each generator phase's slowest
        phases = {f"trainer_{name}": seconds for name, seconds in sent.phase_seconds.items()}
        phases["trainer_total"] = sent.seconds
        phases["generator_total"] = max(r.seconds for r in received)
        for reply in received:
            for name, seconds in reply.phase_seconds.items():
                phases[f"generator_{name}"] = max(phases.get(f"generator_{name}", 0.0), seconds)
        return pb.LoadWeightsResponse(policy_version=min(r.policy_version for r in received),
                                      bytes=sent.bytes * len(received), seconds=time.perf_counter() - started,
                                      phase_seconds=phases)
