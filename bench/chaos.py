"""`make chaos`: a run on the starter models while a helper kills a random process of it with
SIGKILL every ~10 s, beside an unfaulted run with the same seed.

    python -m bench.chaos [--cycles 60] [--interval 10] [--seed 0]

The helper kills the trainer, the generator, the scorer or the coordinator itself (then runs
the same `haoping run --name X` again, as a user or a process manager would), waits until the
run has made up the lost ground, then waits ~interval seconds before the next kill. It prints
cycles completed, faults, restarts, the seconds each fault cost (kill -> the run two cycles past
where it was, minus two unfaulted cycles) and the final mean reward of both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("trainer", "generator", "scorer", "coordinator")


def run_command(args, runs_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", "--name", name, "--runs-dir", str(runs_dir),
            "--cycles", str(args.cycles), "--seed", str(args.seed), "--device", "cpu",
            "--checkpoint-every", str(args.checkpoint_every), "--checkpoint-every-seconds",
            str(args.checkpoint_every_seconds), "--rpc-timeout", "60", *args.run_args]


def cycles_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "cycles.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def service_pid(run_dir: Path, label: str) -> int | None:
    """The PID of the run's live ``label`` service, from its ready file (address, metrics port, PID)."""
    try:
        pid = int((run_dir / "logs" / f"{label}.ready").read_text().split()[2])
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if state != "Z" else None


def run_pids(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def final_reward(records: list[dict], last: int = 5) -> float:
    return statistics.mean(r["reward_mean"] for r in records[-last:])


def clean_run(args, runs_dir: Path) -> tuple[list[dict], float]:
    started = time.monotonic()
    log = open(runs_dir / "clean.log", "w")
    done = subprocess.run(run_command(args, runs_dir, "clean"), stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the unfaulted run failed ({done.returncode}); see {runs_dir / 'clean.log'}")
    return cycles_logged(runs_dir / "clean"), time.monotonic() - started


class Chaos:
    def __init__(self, args, runs_dir: Path, cycle_seconds: float):
        self.args, self.runs_dir = args, runs_dir
        self.run_dir = runs_dir / "faulted"
        self.command = run_command(args, runs_dir, "faulted")
        self.rng = random.Random(args.chaos_seed)
        self.cycle_seconds = cycle_seconds
        self.log = open(runs_dir / "faulted.log", "w")
        self.faults: list[dict] = []
        self.launches = 0
        self.coordinator = self.launch()

    def launch(self) -> subprocess.Popen:
        self.launches += 1
        return subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)

    def done(self) -> bool:
        return self.coordinator.poll() is not None and self.coordinator.returncode == 0

    def wait_for(self, cycles: int, timeout: float) -> float | None:
        """Seconds until ``cycles`` cycles are logged (None on timeout or a finished run)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if len(cycles_logged(self.run_dir)) >= cycles:
                return time.monotonic() - started
            if self.coordinator.poll() is not None:
                if self.coordinator.returncode == 0:
                    return None
                raise SystemExit(f"the faulted run's coordinator exited {self.coordinator.returncode}; "
                                 f"see {self.runs_dir / 'faulted.log'}")
            time.sleep(0.02)
        return None

    def kill_one(self) -> None:
        target = self.rng.choice(TARGETS)
        pid = self.coordinator.pid if target == "coordinator" else service_pid(self.run_dir, target)
        if pid is None:
            return
        at = len(cycles_logged(self.run_dir))
        killed, killed_at = time.monotonic(), time.time()
        os.kill(pid, signal.SIGKILL)
        if target == "coordinator":
            self.coordinator.wait()
            deadline = time.monotonic() + 20
            while [p for p in run_pids(self.run_dir) if p != os.getpid()] and time.monotonic() < deadline:
                time.sleep(0.05)
            orphans = len(run_pids(self.run_dir))
            self.coordinator = self.launch()
        else:
            orphans = 0
        # two cycles past the kill: the first may have been nearly done when the kill landed
        # a kill after the last cycle (during the final samples) costs no cycle: not counted
        waited = self.wait_for(min(at + 2, self.args.cycles), timeout=300) if at < self.args.cycles else None
        cost = None if waited is None else max(0.0, waited - 2 * self.cycle_seconds)
        self.faults.append({"target": target, "pid": pid, "at_cycle": at, "seconds": cost, "orphans": orphans,
                            "t": killed, "killed_at": killed_at})
        print(f"  killed {target:11s} (pid {pid}) at cycle {at:3d}: "
              + (f"cost {cost:5.1f}s" if cost is not None else "the run finished meanwhile"), flush=True)

    def run(self) -> None:
        self.wait_for(1, timeout=600)
        while not self.done():
            pause = self.args.interval * self.rng.uniform(0.7, 1.3)
            ends = time.monotonic() + pause
            while time.monotonic() < ends and not self.done():
                if self.coordinator.poll() is not None and self.coordinator.returncode != 0:
                    raise SystemExit(f"the faulted run failed; see {self.runs_dir / 'faulted.log'}")
                time.sleep(0.1)
            if self.done():
                break
            self.kill_one()
        self.coordinator.wait()


def breakdown(faults: list[dict], recoveries: list[dict]) -> list[dict]:
    """What each fault's cost consists of, from the coordinator's recoveries.jsonl: until the
    recovery began (detection; for the coordinator: its exit, the services following it, the new
    one's imports), the restart (or, for the coordinator, starting the services), the weight sync,
    and the cycles redone; the rest of the cost is redoing work and the slower cycles after it."""
    out = []
    for fault in faults:
        after = [r for r in recoveries if r["time"] > fault["killed_at"]]
        record = after[0] if after else None
        if record is None or fault["seconds"] is None:
            out.append({"target": fault["target"], "cost": fault["seconds"]})
            continue
        began = record["time"] - record["seconds"]
        if record["kind"] == "resume":
            parts = {"until_relaunched_coordinator_ran": began - fault["killed_at"],
                     "start_services": record.get("services_seconds") or 0.0,
                     "checkpoint_and_sync": record["seconds"] - (record.get("services_seconds") or 0.0)}
        else:
            parts = {"detect": began - fault["killed_at"], "restart": record["restart_seconds"],
                     "sync": record["sync_seconds"]}
        parts = {k: round(v, 2) for k, v in parts.items()}
        out.append({"target": fault["target"], "at_cycle": fault["at_cycle"], "cost": round(fault["seconds"], 1),
                    **parts, "cycles_redone": record.get("cycles_redone", 0),
                    "phases_kept": record.get("phases_kept", []), "spares_used": record.get("spares_used", 0),
                    "rest": round(fault["seconds"] - sum(parts.values()), 2)})
    return out


def restarts_in(log_text: str) -> int:
    return len(re.findall(r"restarting it \(restart", log_text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between kills (+-30%%)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed")
    parser.add_argument("--chaos-seed", type=int, default=1, help="seed of the kill schedule")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--checkpoint-every-seconds", type=float, default=2.0)
    parser.add_argument("--work", default="runs/chaos", help="runs go here (replaced)")
    parser.add_argument("run_args", nargs="*", help="more `haoping run` flags (after --)")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    runs_dir = Path(args.work).resolve()
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    print(f"unfaulted run: {args.cycles} cycles, seed {args.seed}", flush=True)
    clean, clean_seconds = clean_run(args, runs_dir)
    cycle_seconds = statistics.median(r["seconds"] for r in clean)
    print(f"faulted run: a SIGKILL every ~{args.interval:.0f}s", flush=True)
    started = time.monotonic()
    chaos = Chaos(args, runs_dir, cycle_seconds)
    chaos.run()
    faulted_seconds = time.monotonic() - started
    faulted = cycles_logged(runs_dir / "faulted")
    log_text = (runs_dir / "faulted.log").read_text(errors="replace")
    costs = [f["seconds"] for f in chaos.faults if f["seconds"] is not None]
    recoveries_path = runs_dir / "faulted" / "recoveries.jsonl"
    recoveries = [json.loads(line) for line in recoveries_path.read_text().splitlines()] \
        if recoveries_path.exists() else []
    same = [a["reward_mean"] == b["reward_mean"] for a, b in zip(faulted, clean)]
    tail = [r["reward_mean"] for r in clean[-10:]]
    noise = statistics.stdev(tail) if len(tail) > 1 else 0.0
    report = {
        "cycles_asked": args.cycles,
        "cycles_completed": len(faulted),
        "cycles_each_once": [r["cycle"] for r in faulted] == list(range(args.cycles)),
        "faults": len(chaos.faults),
        "faults_by_target": {t: sum(f["target"] == t for f in chaos.faults) for t in TARGETS},
        "service_restarts": restarts_in(log_text),
        "coordinator_relaunches": chaos.launches - 1,
        "fault_seconds": [round(c, 1) for c in costs],
        "max_fault_seconds": round(max(costs), 1) if costs else None,
        "orphans_after_coordinator_kill": sum(f["orphans"] for f in chaos.faults),
        "fault_breakdown": breakdown(chaos.faults, recoveries),
        "final_reward_faulted": round(final_reward(faulted), 4),
        "final_reward_unfaulted": round(final_reward(clean), 4),
        "unfaulted_noise_std_last10": round(noise, 4),
        "cycles_with_the_unfaulted_reward_bit_for_bit": sum(same),
        "first_cycle_differing": same.index(False) if False in same else None,
        "wall_seconds": {"unfaulted": round(clean_seconds, 1), "faulted": round(faulted_seconds, 1)},
        "unfaulted_cycle_seconds": round(cycle_seconds, 2),
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
    }
    report["targets_met"] = {
        "every_cycle_completed": report["cycles_each_once"],
        "each_fault_at_most_15s": bool(costs) and max(costs) <= 15.0,
        "final_reward_within_noise": abs(report["final_reward_faulted"] - report["final_reward_unfaulted"])
        <= max(noise, 1e-9),
    }
    (runs_dir / "chaos.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
