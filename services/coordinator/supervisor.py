"""Supervision of the services a run started: a service that died is restarted on its old
port (so every address stays valid), at most ``max_per_hour`` times per service; each restart
is logged and counted. A restart takes a warm spare (:class:`SparePool`) when one is ready, so it
costs the model load and warm-up, not the interpreter's imports."""
from __future__ import annotations

import subprocess
import time
from collections import defaultdict, deque
from typing import Callable

from haoping.log import get_logger

log = get_logger(__name__)


class RestartBudgetExceeded(RuntimeError):
    pass


class SparePool:
    """Up to ``size`` warm spares (``python -m services.common.spare``), each started by ``start``;
    :meth:`take` hands out a live one, :meth:`refill` starts replacements."""

    def __init__(self, start: Callable[[], subprocess.Popen], size: int):
        self.start, self.size = start, size
        self.idle: list[subprocess.Popen] = []
        self.taken = 0

    def refill(self) -> None:
        self.idle = [p for p in self.idle if p.poll() is None]
        while len(self.idle) < self.size:
            self.idle.append(self.start())

    def take(self) -> subprocess.Popen | None:
        while self.idle:
            spare = self.idle.pop(0)
            if spare.poll() is None:
                self.taken += 1
                return spare
        return None

    def close(self, timeout: float = 5.0) -> None:
        """End of input tells an idle spare to exit; one that does not is killed."""
        for spare in self.idle:
            if spare.stdin and not spare.stdin.closed:
                spare.stdin.close()
        for spare in self.idle:
            try:
                spare.wait(timeout)
            except subprocess.TimeoutExpired:
                spare.kill()
                spare.wait()
        self.idle = []


class Supervisor:
    def __init__(self, services: list, launch: Callable[[object], object], wait: Callable[[object], object],
                 max_per_hour: int = 5, clock: Callable[[], float] = time.monotonic, spares: SparePool | None = None):
        self.services = services  # ServiceProcess list, replaced in place on restart
        self.launch = launch      # dead ServiceProcess -> a started one (not yet serving)
        self.wait = wait          # started ServiceProcess -> the same, serving
        self.max_per_hour = max_per_hour
        self.clock = clock
        self.restart_times: dict[str, deque] = defaultdict(deque)
        self.restarts: dict[str, int] = defaultdict(int)
        self.stopped_on_purpose: set[int] = set()  # PIDs this run ended itself: restarted without charge
        self.spares = spares      # warm spares the launch may take; refilled after each restart

    def stop(self, service) -> None:
        """End ``service`` on purpose (e.g. to restart it); its restart is not counted as a fault."""
        self.stopped_on_purpose.add(service.process.pid)
        service.process.kill()
        service.process.wait()

    def dead(self) -> list:
        return [s for s in self.services if s.process.poll() is not None]

    def _charge(self, name: str) -> None:
        times = self.restart_times[name]
        now = self.clock()
        while times and now - times[0] > 3600:
            times.popleft()
        if len(times) >= self.max_per_hour:
            raise RestartBudgetExceeded(f"{name} died {len(times) + 1} times within an hour "
                                        f"(--max-restarts-per-hour {self.max_per_hour}); giving up")
        times.append(now)

    def restart_dead(self) -> list[str]:
        """Restart every service that has exited, all at once; returns their names (trainer first)."""
        started, launched = time.perf_counter(), {}
        for i, service in enumerate(self.services):
            if service.process.poll() is None:
                continue
            if service.process.pid in self.stopped_on_purpose:
                log.info("restarting %s (stopped on purpose)", service.name)
            else:
                self._charge(service.name)
                log.warning("%s (pid %d) exited with code %s; restarting it (restart %d; log %s)", service.name,
                            service.process.pid, service.process.returncode, self.restarts[service.name] + 1,
                            service.log_path)
            launched[i] = self.launch(service)
        restarted = []
        for i, service in launched.items():
            try:
                self.services[i] = self.wait(service)
            except (RuntimeError, TimeoutError, OSError) as err:  # tried again at the next fault, within budget
                log.error("restarting %s failed: %s", service.name, str(err).splitlines()[0])
                continue
            self.restarts[service.name] += 1
            log.warning("%s serving again at %s after %.1fs", service.name, self.services[i].address,
                        time.perf_counter() - started)
            restarted.append(service.name)
        if self.spares is not None:
            self.spares.refill()
        return restarted
