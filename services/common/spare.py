"""A warm spare: a process that has already imported torch, transformers and the services' code
and waits to become one of them.

Most of a service's start is the interpreter importing torch and transformers (4-6 s on two busy
cores); loading a starter model and warming it up takes well under a second. So the coordinator
keeps spares started ahead of need, and a restart hands one the service's command line instead of
starting a new interpreter (:class:`services.coordinator.supervisor.SparePool`).

    python -m services.common.spare --log <file>

The imports run at the lowest CPU priority: a spare started beside a running loop takes only
the CPU that loop leaves idle, so keeping spares does not slow the run's first cycles, nor a run
recovering from a fault while the pool refills. A spare is a session of its own, which the
kernel's autogroups schedule as one group; the group's nice value goes to 19 for the imports and
back to what it was when the spare becomes a service (unlike a process's or a thread's nice value,
anyone may set it back: threads started meanwhile would inherit a thread's). On a kernel without
autogroups the spare imports at its normal priority.

It reads one JSON line on standard input, ``{"module": "trainer", "argv": [...], "log": "<path>"}``,
sends its output to ``log`` from then on and runs ``services.<module>.server.main(argv)``. At end
of input (the coordinator is gone) it exits without serving anything.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

SERVICES = ("trainer", "generator", "scorer")


def become(order: dict, modules: dict) -> int:
    """Turn into the service ``order`` names: its output to its log, its own argv, its main."""
    module = order["module"]
    if module not in modules:
        print(f"spare: unknown service {module!r}", file=sys.stderr, flush=True)
        return 2
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    argv = [str(a) for a in order["argv"]]
    sys.argv = [f"services.{module}", *argv]
    return modules[module].main(argv)


def exit_with_parent_while_importing() -> None:
    """The imports take seconds: a coordinator killed meanwhile must not leave this process behind
    until they end (once a service, the server's own watch takes over)."""
    parent = os.environ.get("HAOPING_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="spare-parent-watch", daemon=True).start()


IMPORT_NICENESS = 19  # the scheduling group's nice value while importing
AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-123 nice 0" where the kernel has autogroups


def autogroup_nice() -> int | None:
    try:
        return int(AUTOGROUP.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def set_autogroup_nice(nice: int) -> bool:
    """The session's scheduling-group nice value; the kernel refuses changes less than 0.1 s apart
    (EAGAIN), so one more try after that."""
    for attempt in range(2):
        try:
            AUTOGROUP.write_text(str(nice))
            return True
        except BlockingIOError:
            time.sleep(0.11)
        except OSError:
            return False
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.spare", description=__doc__)
    parser.add_argument("--log", required=True, help="where this spare's own output goes until it is a service")
    parser.parse_args(argv)
    exit_with_parent_while_importing()
    started_nice = autogroup_nice()
    lowered = started_nice is not None and set_autogroup_nice(max(started_nice, IMPORT_NICENESS))
    modules = {name: importlib.import_module(f"services.{name}.server") for name in SERVICES}
    print("spare ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    if lowered and not set_autogroup_nice(started_nice):
        print(f"spare: could not set the scheduling group's nice value back to {started_nice}", file=sys.stderr,
              flush=True)
    return become(json.loads(line), modules)


if __name__ == "__main__":
    sys.exit(main())
