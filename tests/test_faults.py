"""Fault injection with the real processes and tiny models: kill -9 of each service in the
middle of its work, of the coordinator, and damaged newest checkpoints. Each run must finish
every cycle asked for, log each cycle once, apply each update once, and leave no process; and
where the run was given the same settings as an unfaulted one, repeat it exactly: the same
rollouts, rewards and updates, bit for bit."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow
CYCLES = 6
# Step and rollout long enough (tens of ms) that a kill lands inside one
PPO = json.dumps({"learning_rate": 0.01, "minibatch_size": 8, "ppo_epochs": 6})


def run_command(tiny_policy, tiny_classifier, runs_dir: Path, cycles: int = CYCLES, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", "--policy", str(tiny_policy), "--scorer-model",
            str(tiny_classifier), "--cycles", str(cycles), "--samples-per-prompt", "4", "--max-new-tokens", "20",
            "--min-new-tokens", "2", "--eval-samples", "4", "--runs-dir", str(runs_dir), "--name", "faulty",
            "--ppo-config", PPO, "--device", "cpu", "--checkpoint-every", "2", "--checkpoint-every-seconds", "0", "--rpc-timeout", "60", *extra]


# what a cycle record holds besides its timings: the rollouts, the rewards, the update's statistics
TIMINGS = ("seconds", "elapsed")


def replayed(run_dir: Path) -> list[dict]:
    """Each cycle's record without its timings."""
    records = [json.loads(line) for line in (run_dir / "cycles.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS and not k.startswith("time/")} for r in records]


def assert_same_as_unfaulted(run_dir: Path, unfaulted: list[dict]) -> None:
    faulted = replayed(run_dir)
    assert len(faulted) == len(unfaulted)
    for mine, theirs in zip(faulted, unfaulted):
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        assert not differing, f"cycle {mine['cycle']} differs from the unfaulted run in {differing[:8]}: " \
                              f"{[(mine.get(k), theirs.get(k)) for k in differing[:3]]}"


@pytest.fixture(scope="module")
def unfaulted(tiny_policy, tiny_classifier, tmp_path_factory) -> list[dict]:
    """The cycles of a run with the tests' settings that nothing interrupts."""
    runs_dir = tmp_path_factory.mktemp("unfaulted")
    done = subprocess.run(run_command(tiny_policy, tiny_classifier, runs_dir), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return replayed(runs_dir / "faulty")


def run_processes(run_dir: Path) -> list[int]:
    """PIDs of every process whose command line names this run's directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmdline:
                pids.append(int(entry.name))
    return pids


def service_pid(run_dir: Path, label: str) -> int | None:
    """The process serving as ``label``: its ready file names it (a warm spare that became the
    service has the spare's command line)."""
    try:
        pid = int((run_dir / "logs" / f"{label}.ready").read_text().split()[2])
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if state != "Z" and pid in run_processes(run_dir) else None


def in_flight(run_dir: Path, label: str) -> bool:
    """The service is handling an RPC right now (its own metrics say so)."""
    try:
        port = int((run_dir / "logs" / f"{label}.ready").read_text().split()[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            body = response.read().decode()
    except (OSError, ValueError, IndexError):
        return False
    found = re.search(r'^haoping_requests_in_flight\{service="\w+"\} (\S+)$', body, re.M)
    return bool(found) and float(found.group(1)) >= 1


def cycles_logged(run_dir: Path) -> int:
    path = run_dir / "cycles.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_mid_work(run_dir: Path, label: str, after_cycles: int, timeout: float = 120) -> dict:
    """Once ``after_cycles`` cycles are logged, SIGKILL the service while it handles an RPC."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cycles_logged(run_dir) < after_cycles:
        time.sleep(0.05)
    pid = service_pid(run_dir, label)
    while time.monotonic() < deadline and not in_flight(run_dir, label):
        time.sleep(0.001)
    pid = service_pid(run_dir, label) or pid
    assert pid, f"no {label} process found"
    os.kill(pid, signal.SIGKILL)
    return {"pid": pid}


def assert_run_complete(run_dir: Path, cycles: int = CYCLES) -> None:
    logged = [json.loads(line)["cycle"] for line in (run_dir / "cycles.jsonl").read_text().splitlines()]
    assert logged == list(range(cycles)), logged
    checkpoints = sorted((run_dir / "checkpoints").glob("cycle-*[0-9]"))
    newest = checkpoints[-1]
    assert newest.name == f"cycle-{cycles:06d}"
    state = json.loads((newest / "trainer_state.json").read_text())
    run_id = json.loads((newest / "coordinator_state.json").read_text())["run_id"]
    # each cycle's update applied exactly once: none lost, none twice
    assert state["steps_done"] == cycles
    assert sorted(state["applied_steps"]) == sorted(f"{run_id}:{i}" for i in range(cycles))
    assert (run_dir / "samples_before.jsonl").exists() and (run_dir / "samples_after.jsonl").exists()
    deadline = time.monotonic() + 15
    while run_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run_processes(run_dir) == [], "processes of the run are left"


@pytest.mark.parametrize("label", ["generator", "scorer", "trainer"])
def test_a_service_killed_mid_request_is_restarted_and_the_run_finishes(tiny_policy, tiny_classifier, tmp_path,
                                                                        label, unfaulted):
    run_dir = tmp_path / "faulty"
    # the scorer's work is the shortest: more texts a cycle so that a kill lands inside a Score
    extra = ["--samples-per-prompt", "12"] if label == "scorer" else []
    process = subprocess.Popen(run_command(tiny_policy, tiny_classifier, tmp_path, CYCLES, *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = {}
    # after cycle 3 (one past the checkpoint at 2): a trainer restart has a cycle to redo
    killer = threading.Thread(target=lambda: killed.update(kill_mid_work(run_dir, label, after_cycles=3)))
    killer.start()
    output, _ = process.communicate(timeout=300)
    killer.join()
    assert process.returncode == 0, output
    assert killed["pid"] and f"{label} (pid {killed['pid']}) exited" in output, output
    assert "serving again" in output
    assert_run_complete(run_dir)
    if label == "trainer":
        assert "continuing from cycle-000002" in output, output
        superseded = [json.loads(line)["cycle"] for line in (run_dir / "cycles.superseded.jsonl").read_text().splitlines()]
        assert superseded and min(superseded) >= 2
    if not extra:
        assert_same_as_unfaulted(run_dir, unfaulted)


def test_a_generator_killed_after_the_step_and_before_the_weight_sync_changes_nothing(tiny_policy, tiny_classifier,
                                                                                      tmp_path, unfaulted):
    """The generator dies while the trainer applies cycle 3's Step: the cycle resumes at the weight
    sync instead of rolling out again with the updated policy, and the run repeats the unfaulted
    one exactly."""
    run_dir = tmp_path / "faulty"
    process = subprocess.Popen(run_command(tiny_policy, tiny_classifier, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    killed = {}

    def kill_generator_during_step():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and cycles_logged(run_dir) < 3:
            time.sleep(0.05)
        while time.monotonic() < deadline and not in_flight(run_dir, "trainer"):
            time.sleep(0.001)
        killed["pid"] = service_pid(run_dir, "generator")
        killed["during_step"] = in_flight(run_dir, "trainer")
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_generator_during_step)
    killer.start()
    output, _ = process.communicate(timeout=300)
    killer.join()
    assert process.returncode == 0, output
    assert f"generator (pid {killed['pid']}) exited" in output, output
    assert killed["during_step"], "the kill did not land during a Step"
    assert_run_complete(run_dir)
    assert_same_as_unfaulted(run_dir, unfaulted)


def test_the_coordinator_stopped_or_killed_and_the_same_command_continues(tiny_policy, tiny_classifier, tmp_path,
                                                                          unfaulted):
    run_dir = tmp_path / "faulty"
    command = run_command(tiny_policy, tiny_classifier, tmp_path)
    # SIGTERM: the cycle in progress finishes, a checkpoint is written, the services stop, exit 0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while cycles_logged(run_dir) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped after" in output, output
    stopped_at = cycles_logged(run_dir)
    assert stopped_at < CYCLES and (run_dir / "checkpoints" / f"cycle-{stopped_at:06d}" / "manifest.json").exists()
    assert run_processes(run_dir) == []
    # kill -9 two cycles later: its services die with it (no orphans still listening)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while cycles_logged(run_dir) < min(stopped_at + 2, CYCLES - 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 15
    while run_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run_processes(run_dir) == []
    newest = max(p.name for p in (run_dir / "checkpoints").glob("cycle-*[0-9]"))
    before = (run_dir / "samples_before.jsonl").read_text()
    config = (run_dir / "config.json").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing run faulty from checkpoint" in again.stdout and newest in again.stdout
    assert (run_dir / "samples_before.jsonl").read_text() == before
    assert (run_dir / "config.json").read_text() == config
    assert_run_complete(run_dir)
    assert_same_as_unfaulted(run_dir, unfaulted)


def _truncate(checkpoint: Path) -> Path:
    target = checkpoint / "policy" / "model.safetensors"
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)
    return target


def _fill_nan(checkpoint: Path) -> Path:
    """NaN weights whose manifest was updated to match: only the finiteness check can catch them."""
    from haoping.checkpoint import _sha256

    target = checkpoint / "policy" / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(target).items()}, target)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["policy/model.safetensors"] = {"size": target.stat().st_size, "sha256": _sha256(target)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_damaged_newest_checkpoints_are_refused_and_the_previous_good_one_used(tiny_policy, tiny_classifier,
                                                                               tmp_path):
    """A finished 6-cycle run (checkpoints 2, 4, 6); the newest truncated and the next NaN-filled:
    continuing it to 8 cycles refuses both, each in one line, and resumes from cycle 2."""
    run_dir = tmp_path / "faulty"
    done = subprocess.run(run_command(tiny_policy, tiny_classifier, tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    damaged = [_truncate(run_dir / "checkpoints" / "cycle-000006"), _fill_nan(run_dir / "checkpoints" / "cycle-000004")]
    again = subprocess.run(run_command(tiny_policy, tiny_classifier, tmp_path, CYCLES + 2), capture_output=True,
                           text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    refusals = [line for line in output.splitlines() if "refused" in line]
    assert len(refusals) == 2, output
    assert str(damaged[0]) in refusals[0] and "size" in refusals[0]
    assert str(damaged[1]) in refusals[1] and "non-finite" in refusals[1]
    assert "continuing run faulty from checkpoint" in again.stdout and "cycle-000002" in again.stdout
    aside = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if ".refused-" in p.name)
    assert len(aside) == 2 and aside[0].startswith("cycle-000004") and aside[1].startswith("cycle-000006")
    superseded = [json.loads(line)["cycle"] for line in (run_dir / "cycles.superseded.jsonl").read_text().splitlines()]
    assert superseded == [2, 3, 4, 5]
    assert_run_complete(run_dir, CYCLES + 2)


def test_sigterm_during_a_long_stream_exits_0_and_the_stream_gets_unavailable(tiny_policy, tmp_path):
    from haoping.client import GeneratorClient
    from services.coordinator.run import start_service

    (tmp_path / "logs").mkdir()
    for attempt in range(2):  # the abort was intermittent: twice
        # a stream of 64 x 64 samples x 40 tokens: above the default request budget, allowed here
        service = start_service("generator", ["--model", str(tiny_policy), "--device", "cpu", "--grace-seconds", "1",
                                              "--drain-announce-seconds", "0.2", "--max-request-tokens", "200000",
                                              "--max-queued-tokens", "400000"], tmp_path, timeout=120,
                                label=f"generator-{attempt}")
        codes = []
        with GeneratorClient(service.address, timeout=60) as client:
            stream = client.generate_stream(["刚收到货，感觉"] * 64, n=64, max_new_tokens=40, seed=attempt)
            reader = threading.Thread(target=lambda: codes.append(_drain(stream)))
            reader.start()
            deadline = time.monotonic() + 30
            while not in_flight(tmp_path, f"generator-{attempt}") and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
            service.process.send_signal(signal.SIGTERM)
            assert service.process.wait(30) == 0, service.log_tail()
            reader.join(30)
        assert codes == ["UNAVAILABLE"], codes
        assert "terminate called" not in service.log_path.read_text()


def _drain(stream) -> str:
    import grpc

    try:
        for _ in stream:
            pass
    except grpc.RpcError as err:
        return err.code().name
    return "OK"
