"""A warm spare imports at the lowest CPU priority and then serves at the priority it started with."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.spare import IMPORT_NICENESS, autogroup_nice

pytestmark = pytest.mark.skipif(autogroup_nice() is None, reason="the kernel has no autogroups (/proc/self/autogroup)")


def _thread_nices(pid: int) -> dict[str, int]:
    """name -> nice value of each thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        nices[f"{name}/{task.name}"] = int(stat[stat.rindex(")") + 2:].split()[16])
    return nices


def _group_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


def test_a_spare_imports_at_nice_19_and_its_service_runs_at_the_starting_priority(tiny_classifier, tmp_path):
    log = tmp_path / "spare.log"
    spare = subprocess.Popen([sys.executable, "-m", "services.common.spare", "--log", str(log)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while _group_nice(spare.pid) != IMPORT_NICENESS:  # set before the first import
            assert spare.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert spare.stdout.readline().strip() == b"spare ready"
        assert _group_nice(spare.pid) == IMPORT_NICENESS  # an idle spare stays out of the way
        ready = tmp_path / "scorer.ready"
        order = {"module": "scorer", "log": str(log), "argv": [
            "--model", str(tiny_classifier), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--device", "cpu", "--threads", "1", "--ready-file", str(ready)]}
        spare.stdin.write((json.dumps(order) + "\n").encode())
        spare.stdin.flush()
        while not ready.exists():
            assert spare.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert int(ready.read_text().split()[2]) == spare.pid  # the spare itself became the scorer
        assert _group_nice(spare.pid) == 0
        assert set(_thread_nices(spare.pid).values()) == {0}, _thread_nices(spare.pid)
        spare.send_signal(signal.SIGTERM)
        assert spare.wait(30) == 0
    finally:
        if spare.poll() is None:
            spare.kill()
            spare.wait()
