"""Which replicas of a role (generators, scorers) a client fans out to, found again at every refresh.

An address flag holds targets, comma-separated:

    host:port            one replica, dialed as written
    dns:///NAME:PORT     every address NAME resolves to (socket.getaddrinfo), resolved afresh at
                         each refresh: a Kubernetes headless Service's name answers with the IP of
                         each ready pod

A refresh resolves the targets, asks every address's grpc.health.v1 service and keeps the SERVING
ones (the members); an address no longer resolved, or not serving, is dropped until it serves
again. Addresses come only from the flags: nothing a peer sends adds one.

The three steps are pure functions (:func:`resolve_targets`, :func:`diff`, :func:`pick_healthy`);
:class:`ReplicaSet` keeps one client per resolved address and applies them.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from haoping.log import get_logger

log = get_logger(__name__)

DNS_SCHEME = "dns:///"
MAX_PARALLEL = 64  # health checks and shards in flight at once; more replicas take turns
C = TypeVar("C")
Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses


@dataclass(frozen=True)
class Target:
    """One entry of an address flag."""
    text: str          # as written, e.g. "dns:///generator:50051" or "10.0.0.3:50051"
    host: str          # the name to resolve (dns) or the host to dial
    port: int
    dns: bool          # resolved afresh at every refresh

    @classmethod
    def fixed(cls, address: str) -> "Target":
        """An address used as given (e.g. one an existing client already dials)."""
        return cls(address, address, 0, False)


def parse_targets(spec: str, flag: str) -> list[Target]:
    """The comma-separated targets of ``spec``; ValueError naming ``flag`` and the bad entry."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"{flag} names no address")
    targets = []
    for entry in entries:
        dns = entry.startswith(DNS_SCHEME)
        rest = entry[len(DNS_SCHEME):] if dns else entry
        host, sep, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:50051
        if not sep or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{flag}: {entry[:200]!r} is neither HOST:PORT nor dns:///NAME:PORT")
        targets.append(Target(entry, host, int(port), dns))
    return targets


def system_resolver(host: str, port: int) -> list[str]:
    """The IP addresses ``host`` resolves to now (the system's resolver: DNS, /etc/hosts)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def join_host_port(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def resolve_targets(targets: Iterable[Target], resolver: Resolver) -> list[tuple[str, Target]]:
    """(address to dial, its target) for every replica the targets name now, in the targets'
    order (a name's addresses sorted), each address once. A name that does not resolve names
    none this time (logged)."""
    found: dict[str, Target] = {}
    for target in targets:
        if not target.dns:
            found.setdefault(target.text, target)
            continue
        try:
            ips = sorted(set(resolver(target.host, target.port)))
        except OSError as err:  # socket.gaierror: unknown name, no answer
            log.warning("%s does not resolve now (%s)", target.text, err)
            continue
        for ip in ips:
            found.setdefault(join_host_port(ip, target.port), target)
    return list(found.items())


def diff(old: list[str], new: list[str]) -> tuple[list[str], list[str]]:
    """(added, dropped): the addresses of ``new`` not in ``old``, and of ``old`` not in ``new``."""
    return [a for a in new if a not in old], [a for a in old if a not in new]


def pick_healthy(addresses: list[str], healthy: Callable[[str], bool], map_=map) -> list[str]:
    """The addresses ``healthy`` says serve, in order (``map_``: e.g. a thread pool's, to ask all at once)."""
    return [address for address, ok in zip(addresses, map_(healthy, addresses)) if ok]


def serving(client) -> bool:
    return client.health_status() == "SERVING"


class ReplicaSet(Generic[C]):
    """The replicas of one role behind address targets: one client per resolved address (kept
    while it resolves, so its channel's reconnects carry on), and ``members``, the addresses
    that served at the last :meth:`refresh`.

    ``connect(address, target)`` makes a client; ``healthy(client)`` asks it (default: its
    grpc.health.v1 status is SERVING); ``on_change(role, added, dropped, members)`` hears of
    every change (e.g. to count it)."""

    def __init__(self, role: str, targets: list[Target], connect: Callable[[str, Target], C],
                 resolver: Resolver = system_resolver, healthy: Callable[[C], bool] = serving,
                 on_change: Callable[[str, list[str], list[str], list[str]], None] | None = None):
        if not targets:
            raise ValueError(f"{role}: no address targets")
        self.role = role
        self.targets = targets
        self.connect = connect
        self.resolver = resolver
        self.healthy = healthy
        self.on_change = on_change
        self.members: list[str] = []
        self._clients: dict[str, C] = {}
        self.pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix=f"{role}-replicas")

    @classmethod
    def of_clients(cls, role: str, clients: list) -> "ReplicaSet":
        """A fixed set: these clients (each with an ``address``), all members until a refresh says otherwise."""
        if not clients:
            raise ValueError(f"{role}: needs at least one client")
        by_address = {client.address: client for client in clients}
        replicas = cls(role, [Target.fixed(a) for a in by_address], lambda address, _target: by_address[address])
        replicas._clients = dict(by_address)
        replicas.members = list(by_address)
        return replicas

    def clients(self) -> list[C]:
        """The members' clients, in the members' order."""
        return [self._clients[address] for address in self.members]

    def refresh(self, admit: Callable[[C], bool] | None = None) -> tuple[list[str], list[str]]:
        """Resolve, health-check, update ``members``; returns (added, dropped). ``admit(client)``
        prepares a replica about to join (e.g. loads the current weights); one it refuses or
        that fails there joins at a later refresh."""
        resolved = resolve_targets(self.targets, self.resolver)
        addresses = [address for address, _ in resolved]
        for address in [a for a in self._clients if a not in addresses]:
            self._clients.pop(address).close()
        for address, target in resolved:
            if address not in self._clients:
                self._clients[address] = self.connect(address, target)
        healthy = pick_healthy(addresses, lambda a: self.healthy(self._clients[a]), self.pool.map)
        members = [a for a in healthy if a in self.members or self._admitted(a, admit)]
        added, dropped = diff(self.members, members)
        self.members = members
        if added or dropped:
            (log.warning if dropped else log.info)("%s replicas: %d serving (%s)%s%s", self.role, len(members), ", ".join(members) or "none",
                        f"; added {', '.join(added)}" if added else "", f"; dropped {', '.join(dropped)}" if dropped else "")
            if self.on_change is not None:
                self.on_change(self.role, added, dropped, members)
        return added, dropped

    def _admitted(self, address: str, admit: Callable[[C], bool] | None) -> bool:
        if admit is None:
            return True
        try:
            return admit(self._clients[address])
        except Exception as err:  # noqa: BLE001 - a replica that cannot be prepared waits for the next refresh
            log.warning("%s replica %s serves but could not join: %s", self.role, address, str(err).splitlines()[0])
            return False

    def await_members(self, timeout: float, admit: Callable[[C], bool] | None = None,
                      poll_seconds: float = 0.5) -> None:
        """Refresh until at least one replica is a member; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self.refresh(admit)
        while not self.members:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.role} serving at {', '.join(t.text for t in self.targets)} "
                                   f"after {timeout:.0f}s")
            time.sleep(poll_seconds)
            self.refresh(admit)

    def close(self) -> None:
        self.pool.shutdown()
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self.members = []
