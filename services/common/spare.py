"""A warm spare: a process that has already imported torch, transformers and the services' code
and waits to become one of them.

Most of a service's start is the interpreter importing torch and transformers (4-6 s on two busy
cores); loading a starter model and warming it up takes well under a second. So the coordinator
keeps spares started ahead of need, and a restart hands one the service's command line instead of
starting a new interpreter (:class:`services.coordinator.supervisor.SparePool`).

    python -m services.common.spare --log <file>

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.spare", description=__doc__)
    parser.add_argument("--log", required=True, help="where this spare's own output goes until it is a service")
    parser.parse_args(argv)
    exit_with_parent_while_importing()
    modules = {name: importlib.import_module(f"services.{name}.server") for name in SERVICES}
    print("spare ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    return become(json.loads(line), modules)


if __name__ == "__main__":
    sys.exit(main())
