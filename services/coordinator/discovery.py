"""The coordinator's generator and scorer replicas, from its address flags (see haoping.discovery):
each a ReplicaSet refreshed before every cycle, its changes logged and counted."""
from __future__ import annotations

import dataclasses

from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, ScorerReplicas
from haoping.discovery import ReplicaSet, Resolver, Target, system_resolver
from services.common import metrics


def count_change(role: str, added: list[str], dropped: list[str], members: list[str]) -> None:
    metrics.REPLICAS_ADDED.labels(role).inc(len(added))
    metrics.REPLICAS_DROPPED.labels(role).inc(len(dropped))
    metrics.REPLICAS.labels(role).set(len(members))


def access_for(access: dict, target: Target) -> dict:
    """Client keyword arguments for one resolved address of ``target``: over TLS, the certificate
    checked is the name's (dialing an IP a name resolved to), unless a server name was given."""
    tls = access.get("tls")
    if tls is None or tls.server_name or not target.dns:
        return access
    return {**access, "tls": dataclasses.replace(tls, server_name=target.host)}


def generator_replicas(targets: list[Target], access: dict, timeout: float,
                       resolver: Resolver = system_resolver) -> GeneratorReplicas:
    return GeneratorReplicas.discovered(ReplicaSet(
        "generator", targets, lambda address, target: GeneratorClient(address, timeout, **access_for(access, target)),
        resolver=resolver, on_change=count_change))


def scorer_replicas(targets: list[Target], access: dict, timeout: float,
                    resolver: Resolver = system_resolver) -> ScorerReplicas:
    return ScorerReplicas(ReplicaSet(
        "scorer", targets, lambda address, target: ScorerClient(address, timeout, **access_for(access, target)),
        resolver=resolver, on_change=count_change))


def metrics_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT of --metrics-address; ValueError naming the flag."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-address {address[:200]!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def start_metrics(address: str) -> int:
    """Serve the coordinator's /metrics at HOST:PORT; returns the port (PORT 0 picks one)."""
    return metrics.start_metrics_server(*metrics_host_port(address), "coordinator")
