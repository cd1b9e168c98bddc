"""Supervision of the services a run started: a service that died is restarted on its old
port (so every address stays valid), at most ``max_per_hour`` times per service; each restart
is logged and counted."""
from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Callable

from haoping.log import get_logger

log = get_logger(__name__)


class RestartBudgetExceeded(RuntimeError):
    pass


class Supervisor:
    def __init__(self, services: list, launch: Callable[[object], object], wait: Callable[[object], object],
                 max_per_hour: int = 5, clock: Callable[[], float] = time.monotonic):
        self.services = services  # ServiceProcess list, replaced in place on restart
        self.launch = launch      # dead ServiceProcess -> a started one (not yet serving)
        self.wait = wait          # started ServiceProcess -> the same, serving
        self.max_per_hour = max_per_hour
        self.clock = clock
        self.restart_times: dict[str, deque] = defaultdict(deque)
        self.restarts: dict[str, int] = defaultdict(int)
        self.stopped_on_purpose: set[int] = set()  # PIDs this run ended itself: restarted without charge

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
        return restarted
