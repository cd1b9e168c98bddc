"""Network namespaces as hosts, joined by a bridge in a namespace of its own: a small private
network on one machine (root only). Every namespace, veth and /etc/netns entry made here carries
the prefix ``hpmh<pid>`` of the process that made it, so leftovers of a test that was killed are
found and removed by the next one (:func:`remove_leftovers`), and a test running at the same time
in another process is left alone. No namespace gets a default route: nothing leaves them."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "hpmh"
LINK_PREFIX = "hm"  # interface names are at most 15 characters: hm<pid>v<n>
NETNS_ETC = Path("/etc/netns")
SUBNET = "10.77.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _kill_namespace_processes(namespace: str) -> None:
    pids = ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 10
    while any(_alive(int(p)) for p in pids if p.isdigit()) and time.monotonic() < deadline:
        time.sleep(0.05)


def _remove_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    ip("netns", "del", namespace, check=False)
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)


def _remove_etc_netns_if_empty() -> None:
    try:
        NETNS_ETC.rmdir()  # only when empty: other entries are not ours
    except OSError:
        pass


def remove_leftovers() -> list[str]:
    """Remove what earlier, dead test processes left (by the pid in their prefix); returns the names."""
    removed = []
    owner = re.compile(rf"^{PREFIX}(\d+)-")
    namespaces = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    entries = [p.name for p in NETNS_ETC.iterdir()] if NETNS_ETC.is_dir() else []
    for name in sorted(set(namespaces) | set(entries)):
        found = owner.match(name)
        if found and not _alive(int(found.group(1))):
            _remove_namespace(name)
            removed.append(name)
    link = re.compile(rf"^\d+: ({LINK_PREFIX}(\d+)[vp]\d+)[@:]")
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        found = link.match(line)
        if found and not _alive(int(found.group(2))):
            ip("link", "del", found.group(1), check=False)
            removed.append(found.group(1))
    _remove_etc_netns_if_empty()
    return removed


class Network:
    """Hosts on one bridge: ``add_host(role, address)`` makes namespace ``hpmh<pid>-<role>`` with a
    veth into the bridge's namespace and ``address``/24 on it."""

    def __init__(self):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.link_tag = f"{LINK_PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}-bridge"
        self.namespaces: list[str] = []
        self.hosts: dict[str, str] = {}  # role -> address
        self.interfaces: dict[str, str] = {}  # role -> its veth's name inside its namespace
        self._links = 0
        self._add_namespace(self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def namespace(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def add_host(self, role: str, address: str) -> str:
        name = self.namespace(role)
        self._add_namespace(name)
        self._links += 1
        inside, outside = f"{self.link_tag}v{self._links}", f"{self.link_tag}p{self._links}"
        ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        ip("link", "set", inside, "netns", name)
        ip("link", "set", outside, "netns", self.bridge)
        ip("-n", self.bridge, "link", "set", outside, "master", "br0")
        ip("-n", self.bridge, "link", "set", outside, "up")
        ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
        ip("-n", name, "link", "set", inside, "up")
        self.hosts[role] = address
        self.interfaces[role] = inside
        return name

    def write_hosts(self, role: str, names: dict[str, list[str]]) -> Path:
        """/etc/netns/<namespace>/hosts: what `ip netns exec` shows that host as /etc/hosts."""
        directory = NETNS_ETC / self.namespace(role)
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{address} {name}" for name, addresses in names.items()
                                           for address in addresses]
        (directory / "hosts").write_text("\n".join(lines) + "\n")
        return directory / "hosts"

    def command(self, role: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``role``'s namespace (``ip netns exec`` execs it: the same pid)."""
        return ["ip", "netns", "exec", self.namespace(role), *argv]

    def default_routes(self) -> dict[str, str]:
        """Each namespace's default route (none expected)."""
        return {name: ip("-n", name, "route", "show", "default").stdout.strip() for name in self.namespaces}

    def remove(self) -> None:
        """Every process in the namespaces, the namespaces (their veths go with them), the /etc/netns entries."""
        for name in reversed(self.namespaces):
            _remove_namespace(name)
        for role in self.hosts:
            shutil.rmtree(NETNS_ETC / self.namespace(role), ignore_errors=True)
        for line in ip("-o", "link", "show", check=False).stdout.splitlines():
            found = re.match(rf"^\d+: ({self.link_tag}[vp]\d+)[@:]", line)
            if found:  # a veth half-made when something failed
                ip("link", "del", found.group(1), check=False)
        _remove_etc_netns_if_empty()

    def leftovers(self) -> list[str]:
        """Anything of this network still present (expected: nothing, after :meth:`remove`)."""
        names = ip("netns", "list", check=False).stdout
        links = ip("-o", "link", "show", check=False).stdout
        etc = [p.name for p in NETNS_ETC.iterdir()] if NETNS_ETC.is_dir() else []
        return ([n for n in re.findall(r"^(\S+)", names, re.M) if n.startswith(self.tag)]
                + re.findall(rf"({self.link_tag}[vp]\d+)", links) + [e for e in etc if e.startswith(self.tag)])
