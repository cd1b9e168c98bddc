"""The coordinator: starts the three services (or uses running ones, e.g. under docker compose),
runs rollout -> score -> update -> sync cycles, and writes the run directory (cycles.jsonl,
samples, curves, checkpoints).

It never loses a run: a checkpoint every ``--checkpoint-every`` cycles and on every graceful
stop; a service it started that dies is restarted (the trainer from the newest good
checkpoint) and the interrupted cycle redone; running services are waited for; and
``haoping run --name X`` on an existing run continues it."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import grpc

from haoping import text_metrics
from haoping.atomic import atomic_write_json, atomic_write_text
from haoping.checkpoint import CheckpointError, CheckpointStore, checkpoint_interval, cycle_label, verify_checkpoint
from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, TrainerClient
from haoping.discovery import Target, parse_targets
from haoping.log import get_logger
from haoping.prompts import DEFAULT_PROMPTS
from haoping.scorers import ScoreTimeout
from haoping.scorers.terminal import HumanStopped, LocalScorerClient, TerminalScorer
from haoping.ppo_config import PPOConfig
from haoping.v1 import haoping_pb2 as pb
from services.common.config import add_client_access_flags, add_dataclass_flags, add_flag, dataclass_flag_values
from services.common.security import client_access, write_token_file
from services.coordinator import discovery
from services.coordinator.rundir import ConfigMismatch, CycleLog, fresh_name, resumed_settings, save_config
from services.coordinator.supervisor import RestartBudgetExceeded, SparePool, Supervisor
from services.coordinator.weight_sync import BroadcastSync

log = get_logger(__name__)

SAMPLES_SEED = 20240601  # before/after samples: same prompts, same seed
EVAL_CHUNK = 64


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    address: str
    metrics_port: int
    log_path: Path
    token_file: Path | None = None  # the token its protected RPCs take (see :func:`start_service`)
    module: str = ""  # services.<module>, and the arguments it was started with: to restart it
    args: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_service(name: str, extra_args: list[str], run_dir: Path, timeout: float = 900.0,
                  label: str = "", token_file: Path | None = None) -> ServiceProcess:
    """Start `python -m services.<name>` on a free loopback port and wait until it is SERVING.

    ``label`` (default: the name) names its log and ready files, e.g. generator-2 for a replica.
    The service takes ``token_file`` (default: ``run_dir/auth-token``, made once with a random
    token), so the services of one run dir share a token; clients pass ``token_file=``."""
    return wait_ready(launch_service(name, extra_args, run_dir, label, token_file), timeout)


def launch_service(name: str, extra_args: list[str], run_dir: Path, label: str = "",
                   token_file: Path | None = None, spare: subprocess.Popen | None = None) -> ServiceProcess:
    """Start `python -m services.<name>` without waiting; :func:`wait_ready` fills in its address.
    With ``spare`` (see :func:`launch_spare`), that process becomes the service instead."""
    label = label or name
    if token_file is None:
        token_file = run_dir / "auth-token"
        if not token_file.exists():
            write_token_file(token_file)
    ready = run_dir / "logs" / f"{label}.ready"
    ready.unlink(missing_ok=True)
    log_path = run_dir / "logs" / f"{label}.log"
    command = [sys.executable, "-m", f"services.{name}", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--ready-file", str(ready), "--auth-token-file", str(token_file), *extra_args]
    if spare is not None:
        spare.stdin.write(json.dumps({"module": name, "argv": command[3:], "log": str(log_path)}).encode() + b"\n")
        spare.stdin.close()
        process = spare
    else:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=_service_env(),
                                       start_new_session=True)
    return ServiceProcess(label, process, "", 0, log_path, token_file=token_file, module=name, args=list(extra_args))


def _service_env() -> dict:
    # the service exits when this process dies; its own session: a Ctrl-C in the terminal reaches the
    # coordinator, which stops it after a checkpoint
    return {**os.environ, "HAOPING_PARENT_PID": str(os.getpid())}


def launch_spare(run_dir: Path, number: int) -> subprocess.Popen:
    """A warm spare (services.common.spare) for this run: it imports the services' code now and
    becomes a service when :func:`launch_service` hands it one; it exits with this process."""
    log_path = run_dir / "logs" / f"spare-{number}.log"
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "services.common.spare", "--log", str(log_path)],
                                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=_service_env(),
                                start_new_session=True)


def wait_ready(service: ServiceProcess, timeout: float = 900.0) -> ServiceProcess:
    """Wait until ``service`` wrote its ready file (it is SERVING); fills in address and metrics port."""
    ready = service.log_path.with_suffix(".ready")
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode}; log "
                               f"{service.log_path}:\n" + service.log_tail())
        if time.monotonic() > deadline:
            service.process.kill()
            raise TimeoutError(f"{service.name} not ready after {timeout:.0f}s; see {service.log_path}")
        time.sleep(0.1)
    address, metrics_port = ready.read_text().split()[:2]
    service.address, service.metrics_port = address, int(metrics_port)
    return service


def stop_services(services: list[ServiceProcess], timeout: float = 30.0) -> None:
    for service in services:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in services:
        try:
            code = service.process.wait(timeout)
            if code != 0:
                log.warning("%s exited with code %d (log %s)", service.name, code, service.log_path)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", service.name, timeout)
            service.process.kill()


def sample_records(response: pb.GenerateResponse, scores: pb.ScoreResponse, prompts: list[str]) -> list[dict]:
    return [{"prompt": prompts[s.prompt_index], "text": s.full_text, "response": s.text,
             "reward": round(score.score, 4), "finish_reason": pb.FinishReason.Name(s.finish_reason),
             "policy_version": s.policy_version}
            for s, score in zip(response.samples, scores.scores)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def guard_figures(texts: list[str]) -> dict[str, float]:
    return {"distinct2": text_metrics.distinct_n(texts, 2),
            "repetition_rate": text_metrics.repetition_rate(texts),
            "empty_rate": text_metrics.empty_rate(texts)}


def cycle_seed(seed: int, index: int) -> int:
    """The rollout seed of cycle ``index``: every cycle samples afresh, reproducibly."""
    return seed * 100003 + index


RECOVERABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_FAILURES_WITHOUT_PROGRESS = 10


@dataclass
class RunState:
    """The coordinator's own state, saved in every checkpoint (coordinator_state.json)."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    next_cycle: int = 0
    ppo_seconds: float = 0.0
    start_distinct2: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | None, run_id: str) -> "RunState":
        """The state saved in ``checkpoint``, or a start at cycle 0 (same run id) without one."""
        path = checkpoint / "coordinator_state.json" if checkpoint else None
        if path is None or not path.exists():
            return cls(run_id=run_id)
        return cls(**json.loads(path.read_text()))


class Coordinator:
    def __init__(self, args, generator: GeneratorClient | GeneratorReplicas, scorer: ScorerClient,
                 trainer: TrainerClient, trainer_address: str, run_dir: Path, state: RunState | None = None,
                 supervisor: Supervisor | None = None, stop: threading.Event | None = None, label_prefix: str = "",
                 discovered: tuple = ()):
        self.args = args
        self.generator, self.scorer, self.trainer = generator, scorer, trainer
        self.trainer_address = trainer_address
        self.run_dir = run_dir
        self.prompts = args.prompts
        self.state = state or RunState()
        self.supervisor = supervisor  # None: running services, waited for instead of restarted
        self.stop = stop or threading.Event()
        self.cycle_log = CycleLog(run_dir)
        self.checkpoint_every = getattr(args, "checkpoint_every", 10)
        self.checkpoint_every_seconds = getattr(args, "checkpoint_every_seconds", 0.0)
        self.checkpoint_max_overhead = getattr(args, "checkpoint_max_overhead", 0.05)
        self._checkpointed_time = time.monotonic()
        self._checkpoint_seconds = 0.0  # how long the last checkpoint took
        self.faults: list[dict] = []
        self.resumed_from: Path | None = None  # set by the trainer restart: the checkpoint it loaded
        self._failures = 0
        self._checkpointed_at = -1
        self._progress: dict = {}  # the phases of the cycle in progress done so far (see :meth:`cycle`)
        self.label_prefix = label_prefix
        self.broadcast = BroadcastSync(trainer, trainer_address) \
            if getattr(args, "weight_sync", "pull") == "broadcast" else None
        # GeneratorReplicas/ScorerReplicas (of generator and scorer) refreshed before every cycle
        self.discovered = discovered

    def _sample(self, seed: int, n: int) -> tuple[pb.GenerateResponse, pb.ScoreResponse]:
        response = self.generator.generate(self.prompts, n=n, max_new_tokens=self.args.max_new_tokens,
                                           temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                                           min_new_tokens=self.args.min_new_tokens)
        scores = self.scorer.score([s.full_text for s in response.samples])
        return response, scores

    def write_samples(self, name: str) -> list[dict]:
        n = max(1, -(-self.args.eval_samples // len(self.prompts)))
        records = []
        # requests of at most EVAL_CHUNK samples a prompt (the generator's default bound), each with its own seed
        for chunk, start in enumerate(range(0, n, EVAL_CHUNK)):
            response, scores = self._sample(SAMPLES_SEED + chunk, min(EVAL_CHUNK, n - start))
            records += sample_records(response, scores, self.prompts)
        write_jsonl(self.run_dir / name, records)
        return records

    def step_id(self, index: int) -> str:
        return f"{self.state.run_id}:{index}"

    def cycle(self, index: int) -> dict:
        """One rollout -> score -> update -> weight-sync cycle. Each phase's result is kept until the
        cycle is logged, so a cycle redone after a fault resumes at the phase that failed: after an
        applied Step it only syncs the weights, and does not roll out again with the updated policy
        (which the unfaulted run never did). A trainer restart drops them (see :meth:`rewind`)."""
        a = self.args
        if self._progress.get("cycle") != index:
            self._progress = {"cycle": index}
        done = self._progress  # phase -> (result, seconds)
        if "rollout" not in done:
            t0 = time.perf_counter()
            done["rollout"] = (self.generator.generate(
                self.prompts, n=a.samples_per_prompt, max_new_tokens=a.max_new_tokens, temperature=1.0, top_k=0,
                top_p=1.0, seed=cycle_seed(a.seed, index), min_new_tokens=a.min_new_tokens),
                time.perf_counter() - t0)
        response = done["rollout"][0]
        if "score" not in done:
            t0 = time.perf_counter()
            done["score"] = (self.scorer.score([s.full_text for s in response.samples]), time.perf_counter() - t0)
        scores = done["score"][0]
        # raw scores: every reward transformation (empty responses, normalization, ...) is the trainer's
        rollouts = [pb.Rollout(query_token_ids=s.prompt_token_ids, response_token_ids=s.response_token_ids,
                               reward=score.score, policy_version=s.policy_version)
                    for s, score in zip(response.samples, scores.scores)]
        if "update" not in done:
            t0 = time.perf_counter()
            done["update"] = (self.trainer.step(rollouts, min_new_tokens=a.min_new_tokens,
                                                step_id=self.step_id(index)), time.perf_counter() - t0)
        step = done["update"][0]
        t0 = time.perf_counter()
        sync_method = self.sync_weights(step.policy_version)
        done["weight_sync"] = (sync_method, time.perf_counter() - t0)
        seconds = {phase: done[phase][1] for phase in ("rollout", "score", "update", "weight_sync")}
        stats = dict(step.stats)
        stats["env/score_mean"] = sum(s.score for s in scores.scores) / len(scores.scores)
        texts = [s.text for s in response.samples]
        record = {
            "cycle": index,
            "reward_mean": stats["env/reward_mean"],
            "kl": stats["objective/kl"],
            "policy_version": step.policy_version,
            "rollout_policy_version": response.policy_version,
            "seconds": sum(seconds.values()),
            "samples": len(rollouts),
            **{f"time/{phase}": value for phase, value in seconds.items()},
            "weight_sync": sync_method,
            **guard_figures(texts),
            **stats,
        }
        record["examples"] = [response.samples[i].full_text for i in (0, len(response.samples) // 2)]
        return record

    def sync_weights(self, version: int) -> str:
        """Every generator at ``version``: by broadcast when asked for, by the pull otherwise and
        whenever the broadcast failed. Returns how: broadcast, pull or pull-after-broadcast."""
        if self.broadcast is not None:
            try:
                synced = self.broadcast.sync(getattr(self.generator, "clients", [self.generator]), version)
                mark_synced = getattr(self.generator, "mark_synced", None)  # replicas: for the ones joining later
                if mark_synced is not None:
                    mark_synced(self.trainer_address, synced.policy_version)
                return "broadcast"
            except grpc.RpcError as err:
                log.warning("weight broadcast failed (%s: %s); the generators pull instead", err.code().name,
                            err.details())
            self.generator.load_weights(self.trainer_address, version)
            return "pull-after-broadcast"
        self.generator.load_weights(self.trainer_address, version)
        return "pull"

    def check_guards(self, record: dict) -> list[str]:
        a = self.args
        warnings = []
        if not record["kl"] <= a.max_kl:  # NaN fails too
            warnings.append(f"KL {record['kl']:.2f} nats/seq above --max-kl {a.max_kl}")
        start = self.state.start_distinct2
        if start and not record["distinct2"] >= a.min_distinct2_ratio * start:
            warnings.append(f"distinct-2 {record['distinct2']:.3f} below {a.min_distinct2_ratio:.2f}x "
                            f"the start ({start:.3f})")
        if not record["repetition_rate"] <= a.max_repetition_rate:
            warnings.append(f"repetition rate {record['repetition_rate']:.2f} above --max-repetition-rate "
                            f"{a.max_repetition_rate}")
        return warnings

    # ------------------------------------------------------------ the run, resilient

    def run(self) -> list[dict]:
        """Cycles from ``state.next_cycle`` up to ``--cycles``; a fault (a service gone or too
        slow) is recovered from and the interrupted cycle redone. Returns every cycle's record."""
        while True:
            try:
                return self._run_from_state()
            except grpc.RpcError as err:
                failed: grpc.RpcError | None = err
            while failed is not None:  # a fault during the recovery (e.g. the resync) is recovered from too
                try:
                    self.recover(failed)
                    failed = None
                except grpc.RpcError as err:
                    if err is failed:
                        raise
                    failed = err

    def _run_from_state(self) -> list[dict]:
        a = self.args
        before_path = self.run_dir / "samples_before.jsonl"
        if not before_path.exists():
            before = self.write_samples(before_path.name)
            log.info("before training: mean reward %.3f over %d samples", _mean(r["reward"] for r in before),
                     len(before))
        else:  # a continued run keeps the start it had
            before = [json.loads(line) for line in before_path.read_text(encoding="utf-8").splitlines() if line]
        self.state.start_distinct2 = text_metrics.distinct_n([r["response"] for r in before], 2)
        while self.state.next_cycle < a.cycles and not self.stop.is_set():
            if a.max_seconds and self.state.ppo_seconds >= a.max_seconds:
                log.info("stopping at cycle %d: --max-seconds %.0f reached", self.state.next_cycle, a.max_seconds)
                break
            self._check_services()
            self._one_cycle(self.state.next_cycle)
            self._failures = 0
            if self.checkpoint_due():
                self.checkpoint()
        if self._checkpointed_at != self.state.next_cycle:
            self.checkpoint()  # the end, --max-seconds or a signal: a graceful stop always checkpoints
        records = self.cycle_log.records()
        if self.stop.is_set():
            return records
        after = self.write_samples("samples_after.jsonl")
        log.info("after training: mean reward %.3f over %d samples", _mean(r["reward"] for r in after), len(after))
        from haoping.plots import plot_reward_kl  # matplotlib costs 0.4 s: not on a relaunch's path to its first cycle

        plot_reward_kl(records, self.run_dir / "reward_kl.png", title=f"haoping run {self.run_dir.name}")
        return records

    def _one_cycle(self, index: int) -> None:
        record = self.cycle(index)
        self.state.ppo_seconds += record["seconds"]
        record["elapsed"] = self.state.ppo_seconds
        record.update({f"replicas/{r.replicas.role}": len(r.clients) for r in self.discovered})
        self.cycle_log.append(record)
        self.state.next_cycle = index + 1
        print(f"cycle {index:3d}  reward {record['reward_mean']:.3f}  kl {record['kl']:6.2f}  "
              f"kl_coef {record['objective/kl_coef']:.3f}  distinct2 {record['distinct2']:.2f}  "
              f"v{record['policy_version']}  {record['seconds']:.1f}s", flush=True)
        for example in record["examples"]:
            print(f"    {example}", flush=True)
        for warning in self.check_guards(record):
            log.warning("guard: %s", warning)

    def checkpoint_due(self) -> bool:
        """After a cycle: every ``--checkpoint-every`` cycles, or once ``--checkpoint-every-seconds``
        passed since the last checkpoint (or the start), so a trainer fault redoes at most that much."""
        by_count = self.checkpoint_every and self.state.next_cycle % self.checkpoint_every == 0
        interval = checkpoint_interval(self.checkpoint_every_seconds, self._checkpoint_seconds,
                                       self.checkpoint_max_overhead)
        by_time = interval and time.monotonic() - self._checkpointed_time >= interval
        return bool(by_count or by_time)

    def checkpoint(self) -> pb.SaveCheckpointResponse:
        """The trainer's state and this coordinator's, as checkpoints/cycle-NNNNNN (cycles done)."""
        started = time.monotonic()
        saved = self.trainer.save_checkpoint(self.label_prefix + cycle_label(self.state.next_cycle),
                                             self.state.to_bytes())
        atomic_write_json(self.run_dir / "coordinator_state.json", asdict(self.state))
        self._checkpointed_at = self.state.next_cycle
        self._checkpointed_time = time.monotonic()
        self._checkpoint_seconds = self._checkpointed_time - started
        log.info("checkpoint %s: %d cycles, policy version %d, %d updates applied", saved.label,
                 self.state.next_cycle, saved.policy_version, saved.steps_done)
        return saved

    def _check_services(self) -> None:
        """Before a cycle: restart a supervised service found dead, without waiting for an RPC to fail,
        and find the generator and scorer replicas serving now."""
        if self.supervisor is not None and self.supervisor.dead():
            self._recover_supervised("a service exited")
        for replicas in self.discovered:
            replicas.refresh()
            if not replicas.clients:
                replicas.await_members(getattr(self.args, "service_wait_seconds", 600.0))

    def recover(self, err: grpc.RpcError) -> None:
        """After an RPC failed: restart what died (or wait for running services), resync the
        generators; the caller redoes the interrupted cycle. Re-raises what is not a fault."""
        dead = self.supervisor.dead() if self.supervisor is not None else []
        if err.code() not in RECOVERABLE and not dead:
            raise err
        self._failures += 1
        if self._failures > MAX_FAILURES_WITHOUT_PROGRESS:
            raise err
        reason = f"{err.code().name}: {err.details()}"
        if self.supervisor is not None:
            self._recover_supervised(reason)
        else:
            self._wait_for_running_services(reason)

    def _recover_supervised(self, reason: str) -> None:
        started = time.perf_counter()
        log.warning("cycle %d interrupted (%s)", self.state.next_cycle, reason)
        if any(s.module == "trainer" for s in self.supervisor.dead()):
            # the trainer comes back at its checkpoint's version, older than the generators' now, which
            # they would refuse: they restart with it, at once, and load it
            self._kill_generators()
        spares_before = self.supervisor.spares.taken if self.supervisor.spares else 0
        restarted = self.supervisor.restart_dead()
        restart_seconds = time.perf_counter() - started
        redone = self.rewind(self.resumed_from) if "trainer" in restarted else 0
        synced = time.perf_counter()
        self.resync_generators()
        fault = {"cycle": self.state.next_cycle, "restarted": restarted, "seconds": time.perf_counter() - started,
                 "restart_seconds": restart_seconds, "sync_seconds": time.perf_counter() - synced,
                 "spares_used": (self.supervisor.spares.taken if self.supervisor.spares else 0) - spares_before,
                 "cycles_redone": redone, "phases_kept": [p for p in self._progress if p != "cycle"]}
        self.faults.append(fault)
        self.record_recovery("restart", reason=reason, **fault)

    def record_recovery(self, kind: str, **details) -> None:
        """A line in recoveries.jsonl: what a fault cost, part by part (bench/chaos.py reads it)."""
        with open(self.run_dir / "recoveries.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps({"kind": kind, "time": time.time(), **details}) + "\n")

    def _wait_for_running_services(self, reason: str) -> None:
        started = time.perf_counter()
        wait = getattr(self.args, "service_wait_seconds", 600.0)
        log.warning("cycle %d interrupted (%s); waiting up to %.0fs for the services", self.state.next_cycle,
                    reason, wait)
        for replicas in self.discovered:  # a replica gone is dropped; one serving is enough
            replicas.await_members(wait)
        fixed = [c for c in (self.scorer, self.generator) if not any(c is r for r in self.discovered)]
        clients = [self.trainer, *(client for c in fixed for client in getattr(c, "clients", [c]))]
        for client in clients:
            client.await_serving(wait)
        update = self._progress.get("update")
        if update and self.trainer.info().policy_version < update[0].policy_version:
            self._progress.pop("update")  # a trainer that came back from an older checkpoint lost this Step
        self.resync_generators()
        self.faults.append({"cycle": self.state.next_cycle, "restarted": [],
                            "seconds": time.perf_counter() - started})

    def rewind(self, checkpoint: Path | None) -> int:
        """The trainer came back from ``checkpoint`` (None: from the start): continue from there.
        Returns how many logged cycles are redone."""
        start_distinct2 = self.state.start_distinct2
        self._progress = {}  # the trainer forgot any Step since its checkpoint: those cycles are redone whole
        self.state = RunState.of_checkpoint(checkpoint, self.state.run_id)
        self.state.start_distinct2 = self.state.start_distinct2 or start_distinct2
        moved = self.cycle_log.rewind(self.state.next_cycle)
        log.warning("continuing from %s at cycle %d; %d later cycle(s) moved to %s and redone",
                    checkpoint.name if checkpoint else "the start", self.state.next_cycle, moved,
                    self.cycle_log.superseded.name)
        return moved

    def _kill_generators(self) -> None:
        for service in self.supervisor.services:
            if service.module == "generator" and service.process.poll() is None:
                self.supervisor.stop(service)

    def resync_generators(self) -> None:
        try:
            synced = self.generator.load_weights(self.trainer_address)
        except grpc.RpcError as err:
            # a generator that refuses a version older than its own (after the trainer went back
            # to a checkpoint) starts afresh and loads it
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION or self.supervisor is None:
                raise
            log.warning("a generator refused the trainer's weights (%s); restarting the generators", err.details())
            self._kill_generators()
            self.supervisor.restart_dead()
            synced = self.generator.load_weights(self.trainer_address)
        log.info("generators at policy version %d", synced.policy_version)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--name", "", help="run name (default: a timestamp); output goes to <runs-dir>/<name>")
    add_flag(parser, "--runs-dir", "runs", help="where run directories go")
    add_flag(parser, "--cycles", 50, int, "rollout -> score -> update cycles")
    add_flag(parser, "--max-seconds", 0.0, float, "stop cycling once this much PPO time has passed (0: no limit)")
    add_flag(parser, "--samples-per-prompt", 16, int, "rollouts per prompt per cycle")
    add_flag(parser, "--max-new-tokens", 16, int, "response length (the reference design's gen_len)")
    add_flag(parser, "--min-new-tokens", 8, int,
             "EOS is not sampled (nor scored by the trainer) before this many tokens: no one-word reviews")
    add_flag(parser, "--eval-samples", 64, int, "samples in samples_before/after.jsonl")
    add_flag(parser, "--seed", 0, int, "seed for rollouts and PPO")
    add_flag(parser, "--policy", "starter:policy", help="initial policy: starter:policy, a dir or a hub ID")
    add_flag(parser, "--scorer-backend", "classifier", help="classifier, reward-model or human")
    add_flag(parser, "--human-ui", "web", choices=("web", "terminal"),
             help="human backend: web (the scorer service's rating page) or terminal (this terminal; "
                  "no scorer service)")
    add_flag(parser, "--scorer-model", "starter:classifier", help="scorer model: starter:classifier, a dir or a hub ID")
    add_flag(parser, "--scorer-normalize", "none",
             help="older name of --reward-normalization (none, sigmoid or running), applied by the trainer")
    add_flag(parser, "--score-timeout", 600.0, float,
             "seconds each Score request may take (the human backend waits for a person's ratings)")
    add_flag(parser, "--ppo-config", "", help="JSON object of PPO options passed to the trainer; a typed "
             "PPO option flag below overrides its key")
    add_flag(parser, "--resume", "",
             help="a new run's trainer starts from this checkpoint (e.g. runs/other/checkpoints/cycle-000050); "
                  "an existing run (--name) always continues from its own newest good checkpoint")
    add_flag(parser, "--fresh", False, bool, "when --name exists, start a new run under a new name (name-2, ...)")
    add_flag(parser, "--checkpoint-every", 10, int, "checkpoint every K cycles (and on every graceful stop)")
    add_flag(parser, "--checkpoint-every-seconds", 2.0, float,
             "also checkpoint after a cycle once this many seconds passed since the last checkpoint (more when "
             "--checkpoint-max-overhead asks): a trainer or coordinator fault redoes at most about this much work "
             "(0: by --checkpoint-every only)")
    add_flag(parser, "--checkpoint-max-overhead", 0.05, float,
             "checkpoints by time take at most this share of the run: the interval is at least the last "
             "checkpoint's seconds / this (a large model checkpoints less often)")
    add_flag(parser, "--keep-checkpoints", 3, int, "newest verified checkpoints kept in <run>/checkpoints")
    add_flag(parser, "--rpc-timeout", 300.0, float, "deadline of every Generate, Step and LoadWeights call")
    add_flag(parser, "--service-wait-seconds", 600.0, float,
             "with running services: how long to wait for one that went away to serve again")
    add_flag(parser, "--max-restarts-per-hour", 5, int, "restarts of each service this run started, per hour")
    add_flag(parser, "--warm-spares", 2, int,
             "processes kept ready with the services' code imported, so that restarting a service this run "
             "started skips the interpreter's imports (a trainer restart restarts the generators too)")
    add_flag(parser, "--trainer-nproc", 1, int,
             "trainer processes (data parallel under torchrun; the same updates as one; see docs/distributed.md)")
    add_flag(parser, "--trainer-fsdp", False, bool,
             "with --trainer-nproc > 1: shard the model and optimizer over the trainer processes (FSDP2)")
    add_flag(parser, "--weight-sync", "pull", choices=("pull", "broadcast"),
             help="how generators get each new policy: pull (LoadWeights, the safetensors file over gRPC) or "
                  "broadcast (a torch.distributed group of the trainer and the generators; the pull on failure)")
    add_flag(parser, "--local-weight-files", True, bool,
             "the pull hands the weights over as a file in <run>/weight-files (the services this run starts share "
             "the machine); --no-local-weight-files streams them over gRPC")
    add_flag(parser, "--generator-replicas", 1, int,
             "generator processes; each rollout's samples are split across them and run concurrently")
    add_flag(parser, "--device", "auto", help="torch device for all services")
    add_flag(parser, "--dtype", "float32", help="float32, bfloat16 or float16")
    add_flag(parser, "--generator-dtype", "", choices=("", "float32", "bfloat16", "float16"),
             help="the generators' dtype, when it differs from --dtype: e.g. bfloat16 sampling beside a float32 "
                  "trainer (its Step recomputes every log-probability in its own dtype); empty: --dtype")
    add_flag(parser, "--max-kl", 6.0, float, "guard: warn when KL (nats/seq) goes above")
    add_flag(parser, "--min-distinct2-ratio", 0.5, float, "guard: warn when distinct-2 falls below this x start")
    add_flag(parser, "--max-repetition-rate", 0.1, float, "guard: warn when this share of responses repeats a char 4x")
    add_flag(parser, "--trainer-address", "",
             help="host:port of a running trainer: use the running services (with --generator-addresses and "
                  "--scorer-address, e.g. under docker compose) instead of starting them")
    add_flag(parser, "--generator-addresses", "",
             help="running generators, comma-separated: HOST:PORT (one replica) or dns:///NAME:PORT (every address "
                  "NAME resolves to, resolved again before every cycle, e.g. a Kubernetes headless Service); "
                  "each rollout is split across those that report SERVING (docs/discovery.md)")
    add_flag(parser, "--scorer-address", "",
             help="running scorer(s), in the form of --generator-addresses; each batch is split across them")
    add_flag(parser, "--metrics-address", "",
             help="HOST:PORT to serve this coordinator's /metrics on (replica counts); empty: none")
    add_client_access_flags(parser, token_help="the running services' token file (default: the services this run "
                                               "starts get a fresh random token in <run dir>/auth-token, mode 0600)")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="rollout prompts")
    # the trainer's options; --seed and --min-new-tokens above set its seed and EOS minimum
    add_dataclass_flags(parser, PPOConfig, skip=RUN_SET_OPTIONS, group_title="PPO options (the trainer's PPOConfig)")


RUN_SET_OPTIONS = ("seed", "min_response_tokens")
PPO_OPTION_NAMES = [f.name for f in fields(PPOConfig) if f.name not in RUN_SET_OPTIONS]


# flags that configure the services a run starts; running services were configured by their own flags
SERVICE_FLAGS = ("policy", "scorer_backend", "scorer_model", "scorer_normalize", "ppo_config", "resume",
                 "generator_replicas", "device", "dtype", "generator_dtype", "local_weight_files")


def human_in_terminal(args) -> bool:
    """True when this process itself asks the person for the rewards (no scorer service)."""
    return args.human_ui == "terminal"


def running_services(args) -> tuple[str, list[Target], list[Target]] | None:
    """(trainer address, generator targets, scorer targets) when the run uses running services,
    else None (no scorer targets when the person rates in this terminal). Raises ValueError for a
    partial set, a malformed address, or flags that only configure services it would start."""
    terminal = human_in_terminal(args)
    if terminal and args.scorer_address:
        raise ValueError("--scorer-address is not used with --human-ui terminal: the person rates in this terminal")
    given = [args.trainer_address, args.generator_addresses] + ([] if terminal else [args.scorer_address])
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--trainer-address, --generator-addresses" + ("" if terminal else " and --scorer-address")
                         + " go together")
    defaults = vars(build_parser_defaults())
    own = ("scorer_backend",) if terminal else ()  # the terminal scorer is this process's, not a service's
    changed = [f"--{name.replace('_', '-')}" for name in SERVICE_FLAGS
               if name not in own and getattr(args, name) != defaults[name]]
    changed += [f"--{name.replace('_', '-')}" for name in dataclass_flag_values(args, PPO_OPTION_NAMES)]
    if changed:
        raise ValueError(f"{', '.join(changed)} configure services this run starts; running services take "
                         "their settings from their own flags")
    return args.trainer_address, parse_targets(args.generator_addresses, "--generator-addresses"), \
        ([] if terminal else parse_targets(args.scorer_address, "--scorer-address"))


def build_parser_defaults() -> argparse.Namespace:
    """The run flags' defaults, env fallbacks included."""
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return parser.parse_args([])


def run(args) -> int:
    entered = time.perf_counter()
    runs_dir = Path(args.runs_dir)
    try:
        connect_to = running_services(args)
        if args.metrics_address:
            discovery.metrics_host_port(args.metrics_address)  # checked here, served once the run starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.auth_token_file and not os.access(args.auth_token_file, os.R_OK):
        print(f"error: --auth-token-file {args.auth_token_file} cannot be read", file=sys.stderr)
        return 2
    try:
        args, run_dir, checkpoint = prepare_run_dir(args, runs_dir)
    except (ConfigMismatch, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if checkpoint and RunState.of_checkpoint(checkpoint, "").next_cycle >= args.cycles \
            and (run_dir / "samples_after.jsonl").exists():
        print(f"run {run_dir.name} already completed its {args.cycles} cycles (raise --cycles to continue it)")
        return 0
    latest = runs_dir / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(run_dir.name)

    from haoping.bootstrap import ensure_starter_models

    models = (args.policy,) if args.scorer_backend == "human" else (args.policy, args.scorer_model)
    if connect_to is None and any(ref.startswith("starter:") for ref in models):
        ensure_starter_models()  # once, here, with progress bars, before the services race for it
    stop = threading.Event()
    restore_signals = _stop_on_signals(stop)
    # services this run starts get a fresh token; running ones take the token they were given
    token_file = Path(args.auth_token_file) if args.auth_token_file else None
    if connect_to is None and token_file is None:
        token_file = write_token_file(run_dir / "auth-token")
    services: list[ServiceProcess] = []
    supervisor, services_seconds = None, None
    try:
        state = initial_state(run_dir, checkpoint, supervised=connect_to is None)
        if connect_to is None:
            log.info("starting services (logs in %s)", run_dir / "logs")
            services_started = time.perf_counter()
            start_services(args, run_dir, services, token_file, resume_from=checkpoint)
            services_seconds = time.perf_counter() - services_started
            for s in services:
                log.info("%s serving at %s (metrics http://%s:%d/metrics)", s.name, s.address,
                         s.address.split(":")[0], s.metrics_port)
            trainer_service, generator_services, scorer_service = split_services(services)
            connect_to = trainer_service.address, [Target.fixed(g.address) for g in generator_services], \
                [Target.fixed(scorer_service.address)] if scorer_service else []
            spares = itertools.count(1)
            supervisor = Supervisor(services, lambda dead: None, wait_ready, args.max_restarts_per_hour,
                                    spares=SparePool(lambda: launch_spare(run_dir, next(spares)),
                                                     getattr(args, "warm_spares", 0)))
            supervisor.spares.refill()  # after the services serve: the spares' imports do not slow their start
        trainer_address, generator_targets, scorer_targets = connect_to
        access = {**client_access(args), "token_file": token_file}
        if args.metrics_address:
            try:
                port = discovery.start_metrics(args.metrics_address)
            except OSError as err:
                print(f"error: --metrics-address {args.metrics_address}: {err}", file=sys.stderr)
                return 2
            log.info("coordinator metrics on http://%s:%d/metrics", args.metrics_address.rpartition(":")[0], port)
        scorer_client = (LocalScorerClient(TerminalScorer(), timeout=args.score_timeout) if human_in_terminal(args)
                         else discovery.scorer_replicas(scorer_targets, access, args.score_timeout))
        with discovery.generator_replicas(generator_targets, access, args.rpc_timeout) as generator, \
                scorer_client as scorer, \
                TrainerClient(trainer_address, timeout=args.rpc_timeout, **access) as trainer:
            discovered = (generator,) if human_in_terminal(args) else (generator, scorer)
            for replicas in discovered:
                replicas.await_members(args.service_wait_seconds)
            # running services may keep several runs' checkpoints in one folder: there, name them by run
            prefix = "" if supervisor else re.sub(r"[^A-Za-z0-9._-]", "_", run_dir.name)[:40] + "."
            coordinator = Coordinator(args, generator, scorer, trainer, trainer_address, run_dir, state, supervisor,
                                      stop, prefix, discovered)
            if supervisor is not None:
                supervisor.launch = lambda dead: relaunch_service(dead, coordinator, run_dir)
            redone = coordinator.cycle_log.rewind(state.next_cycle)  # logged before a crash, after the checkpoint
            try:
                synced = generator.load_weights(trainer_address)  # a resumed trainer's policy, or the same start
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                print(f"error: {err.code().name}: {err.details()}\n(pass the services' token file with "
                      "--auth-token-file)", file=sys.stderr)
                return 2
            log.info("%d generator(s) at policy version %d; cycles %d..%d", len(generator.clients),
                     synced.policy_version, state.next_cycle, args.cycles - 1)
            if checkpoint is not None or state.next_cycle:
                coordinator.record_recovery(
                    "resume", cycle=state.next_cycle, checkpoint=checkpoint.name if checkpoint else None,
                    cycles_redone=redone, seconds=time.perf_counter() - entered, services_seconds=services_seconds)
            try:
                records = coordinator.run()
            except (HumanStopped, ScoreTimeout) as stopped:  # the person stopped, or gave no rating in time
                saved = coordinator.checkpoint()
                print(f"stopped: {stopped}; {coordinator.state.next_cycle} cycle(s) done, in "
                      f"{run_dir / 'cycles.jsonl'}; policy version {saved.policy_version} saved to {saved.directory}",
                      flush=True)
                return 0 if isinstance(stopped, HumanStopped) else 1
        print_summary(records, coordinator, run_dir, stop.is_set())
        return 0
    except (RestartBudgetExceeded, TimeoutError) as err:
        print(f"error: {err}; continue the run later with: haoping run --name {run_dir.name} --runs-dir "
              f"{run_dir.parent}", file=sys.stderr)
        return 1
    finally:
        restore_signals()
        if supervisor is not None:
            supervisor.spares.close()
        stop_services(services)


def prepare_run_dir(args, runs_dir: Path) -> tuple[argparse.Namespace, Path, Path | None]:
    """(the run's settings, its directory, the checkpoint to continue from or None).

    A new name: a new run (config.json written). An existing one: continued with its saved
    settings (a differing flag refused), unless --fresh picks a new name."""
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise ValueError(f"--min-new-tokens {args.min_new_tokens} must be in [0, --max-new-tokens {args.max_new_tokens}]")
    if args.generator_replicas < 1:
        raise ValueError(f"--generator-replicas must be >= 1, got {args.generator_replicas}")
    if getattr(args, "trainer_nproc", 1) < 1:
        raise ValueError(f"--trainer-nproc must be >= 1, got {args.trainer_nproc}")
    if human_in_terminal(args):
        if args.scorer_backend != "human":
            raise ValueError("--human-ui terminal needs --scorer-backend human")
        if not sys.stdin.isatty():
            raise ValueError("--human-ui terminal needs a terminal on standard input to ask the person")
    name = args.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.fresh:
        name = fresh_name(runs_dir, name)
    run_dir = runs_dir / name
    store = CheckpointStore(run_dir / "checkpoints", args.keep_checkpoints)
    if (run_dir / "config.json").exists():
        settings = resumed_settings(run_dir, args, vars(build_parser_defaults()))
        args = argparse.Namespace(**{**vars(args), **settings})
        checkpoint = store.newest_good()
        print(f"continuing run {name} from " + (f"checkpoint {checkpoint}" if checkpoint else
                                                "its start (no checkpoint yet)"), flush=True)
        return args, run_dir, checkpoint
    if (run_dir / "cycles.jsonl").exists():
        raise ValueError(f"{run_dir} holds cycles but no config.json; pick another --name or pass --fresh")
    if args.resume:
        verify_checkpoint(args.resume)
    args = argparse.Namespace(**{**vars(args), "name": name})
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    save_config(run_dir, args)
    return args, run_dir, None


def initial_state(run_dir: Path, checkpoint: Path | None, supervised: bool) -> RunState:
    """Where the run continues: the checkpoint's coordinator state when this run starts the
    trainer from it; with running services (whose trainer kept its state) the last saved state,
    advanced past the cycles logged since (the trainer answers a repeated Step id from its store)."""
    saved = run_dir / "coordinator_state.json"
    run_id = json.loads(saved.read_text())["run_id"] if saved.exists() else secrets.token_hex(6)
    if supervised:
        return RunState.of_checkpoint(checkpoint, run_id)
    state = RunState(**json.loads(saved.read_text())) if saved.exists() else RunState(run_id=run_id)
    state.next_cycle = max([state.next_cycle, *(r["cycle"] + 1 for r in CycleLog(run_dir).records())])
    return state


def relaunch_service(dead: ServiceProcess, coordinator: Coordinator, run_dir: Path) -> ServiceProcess:
    """``dead`` started again with its own arguments on its old ports (not yet serving: see
    :func:`wait_ready`); the trainer from the newest good checkpoint (remembered in
    ``coordinator.resumed_from``)."""
    extra = list(dead.args)
    if dead.module == "trainer":
        checkpoint = CheckpointStore(run_dir / "checkpoints", coordinator.args.keep_checkpoints).newest_good()
        coordinator.resumed_from = checkpoint
        resume = checkpoint or coordinator.args.resume
        extra = _without_flag(extra, "--resume") + (["--resume", str(resume)] if resume else [])
    port = dead.address.rsplit(":", 1)[1]
    spares = coordinator.supervisor.spares if coordinator.supervisor else None
    restarted = launch_service(dead.module, extra + ["--port", port, "--metrics-port", str(dead.metrics_port)],
                               run_dir, label=dead.name, token_file=dead.token_file,
                               spare=spares.take() if spares else None)
    restarted.args = extra
    return restarted


def _without_flag(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        else:
            out.append(arg)
    return out


def _stop_on_signals(stop: threading.Event):
    """SIGINT/SIGTERM: finish the cycle, checkpoint, stop the services. A second one stops at once."""
    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after this cycle (a checkpoint is written first)", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def print_summary(records: list[dict], coordinator: Coordinator, run_dir: Path, stopped: bool) -> None:
    if coordinator.faults:
        restarts = dict(coordinator.supervisor.restarts) if coordinator.supervisor else {}
        log.warning("%d fault(s) recovered from, restarts %s, seconds each %s", len(coordinator.faults), restarts,
                    [round(f["seconds"], 1) for f in coordinator.faults])
    if stopped:
        print(f"stopped after {coordinator.state.next_cycle} cycles; continue with: haoping run --name "
              f"{run_dir.name} --runs-dir {run_dir.parent}", flush=True)
        return
    first, last = records[:5], records[-5:]
    print(f"mean reward, first {len(first)} cycles {_mean(r['reward_mean'] for r in first):.3f} -> "
          f"last {len(last)} cycles {_mean(r['reward_mean'] for r in last):.3f}; run dir {run_dir}")


def trainer_ppo_config(args) -> dict:
    """--ppo-config, the typed PPO option flags given, and what the run implies: the run's seed, and
    EOS masked where the generator masks it."""
    ppo_config = json.loads(args.ppo_config) if args.ppo_config else {}
    ppo_config.update(dataclass_flag_values(args, PPO_OPTION_NAMES))
    if getattr(args, "scorer_normalize", "none") != "none":
        ppo_config.setdefault("reward_normalization", args.scorer_normalize)
    ppo_config.setdefault("seed", args.seed)
    ppo_config.setdefault("min_response_tokens", args.min_new_tokens)
    return ppo_config


def start_services(args, run_dir: Path, services: list[ServiceProcess], token_file: Path | None = None,
                   resume_from: Path | None = None) -> None:
    """Start the trainer, ``--generator-replicas`` generators and the scorer, appending each to
    ``services`` as soon as it serves (so the caller can stop whatever did start); all take
    ``token_file``. The trainer starts from ``resume_from`` (the run's own checkpoint), else from
    ``--resume``, else fresh."""
    common = ["--device", args.device, "--dtype", args.dtype]
    # the trainer and its generators run on this machine: weights go through a shared folder
    files = ["--local-weights-dir", str(run_dir / "weight-files")] if getattr(args, "local_weight_files", True) else []
    trainer_args = ["--model", args.policy, "--ppo-config", json.dumps(trainer_ppo_config(args)), *files,
                    "--checkpoint-dir", str(run_dir / "checkpoints"),
                    "--keep-checkpoints", str(getattr(args, "keep_checkpoints", 3)), *common]
    if getattr(args, "trainer_nproc", 1) > 1:
        trainer_args += ["--nproc", str(args.trainer_nproc)]
        if getattr(args, "trainer_fsdp", False):
            trainer_args.append("--fsdp")
    if getattr(args, "weight_sync", "pull") == "broadcast":
        trainer_args += ["--weight-group-port", "0"]  # a free port: runs side by side do not collide
    resume = resume_from or args.resume
    if resume:
        trainer_args += ["--resume", str(resume)]
    # all start at once: the trainer on a port picked here, so the generators know its address
    trainer_address = f"127.0.0.1:{free_port()}"
    services.append(launch_service("trainer", trainer_args + ["--port", trainer_address.rsplit(":", 1)[1]], run_dir,
                                   token_file=token_file))
    # with --human-ui terminal the person at this terminal is the scorer: no scorer service
    scorer = None if human_in_terminal(args) else launch_service(
        "scorer", ["--backend", args.scorer_backend, "--model", args.scorer_model, *common], run_dir,
        token_file=token_file)
    try:
        # replicas keep torch's default threads: the same thread count gives bit-identical samples,
        # so a rollout does not depend on how many replicas share it
        generator_args = ["--model", args.policy, *common, "--trainer-address", trainer_address, *files]
        if getattr(args, "generator_dtype", ""):
            generator_args += ["--dtype", args.generator_dtype]  # the later flag wins
        for replica in range(args.generator_replicas):
            label = "generator" if replica == 0 else f"generator-{replica + 1}"
            services.append(launch_service("generator", generator_args, run_dir, label=label, token_file=token_file))
        for service in services:
            wait_ready(service)
    finally:
        if scorer is not None:
            services.append(scorer)  # last, as split_services expects; stopped with the rest on a failure
    if scorer is not None:
        wait_ready(scorer)


def free_port() -> int:
    """A loopback port free now (the service binds it a moment later, as a restart reuses its port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def split_services(services: list[ServiceProcess]) -> tuple[ServiceProcess, list[ServiceProcess],
                                                           ServiceProcess | None]:
    """(trainer, generators, scorer or None) from the list :func:`start_services` filled."""
    if services[-1].name == "scorer":
        return services[0], services[1:-1], services[-1]
    return services[0], services[1:], None
