"""The coordinator: starts the three services (or uses running ones, e.g. under docker compose),
runs rollout -> score -> update -> sync cycles, and writes the run directory (cycles.jsonl,
samples, curves, final policy)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import grpc

from haoping import text_metrics
from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, TrainerClient
from haoping.log import get_logger
from haoping.plots import plot_reward_kl
from haoping.prompts import DEFAULT_PROMPTS
from haoping.v1 import haoping_pb2 as pb
from haoping.ppo_trainer import PPOConfig
from services.common.config import add_client_access_flags, add_dataclass_flags, add_flag, dataclass_flag_values
from services.common.security import client_access, write_token_file

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
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{label} exited with code {process.returncode}; log {log_path}:\n"
                               + ServiceProcess(label, process, "", 0, log_path).log_tail())
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{label} not ready after {timeout:.0f}s; see {log_path}")
        time.sleep(0.2)
    address, metrics_port = ready.read_text().split()
    return ServiceProcess(label, process, address, int(metrics_port), log_path, token_file)


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
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def guard_figures(texts: list[str]) -> dict[str, float]:
    return {"distinct2": text_metrics.distinct_n(texts, 2),
            "repetition_rate": text_metrics.repetition_rate(texts),
            "empty_rate": text_metrics.empty_rate(texts)}


def cycle_seed(seed: int, index: int) -> int:
    """The rollout seed of cycle ``index``: every cycle samples afresh, reproducibly."""
    return seed * 100003 + index


class Coordinator:
    def __init__(self, args, generator: GeneratorClient | GeneratorReplicas, scorer: ScorerClient,
                 trainer: TrainerClient, trainer_address: str, run_dir: Path):
        self.args = args
        self.generator, self.scorer, self.trainer = generator, scorer, trainer
        self.trainer_address = trainer_address
        self.run_dir = run_dir
        self.prompts = args.prompts

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

    def cycle(self, index: int) -> dict:
        a = self.args
        t0 = time.perf_counter()
        response = self.generator.generate(self.prompts, n=a.samples_per_prompt, max_new_tokens=a.max_new_tokens,
                                           temperature=1.0, top_k=0, top_p=1.0, seed=cycle_seed(a.seed, index),
                                           min_new_tokens=a.min_new_tokens)
        t1 = time.perf_counter()
        scores = self.scorer.score([s.full_text for s in response.samples])
        t2 = time.perf_counter()
        # raw scores: every reward transformation (empty responses, normalization, ...) is the trainer's
        rollouts = [pb.Rollout(query_token_ids=s.prompt_token_ids, response_token_ids=s.response_token_ids,
                               reward=score.score, policy_version=s.policy_version)
                    for s, score in zip(response.samples, scores.scores)]
        step = self.trainer.step(rollouts, min_new_tokens=a.min_new_tokens)
        t3 = time.perf_counter()
        self.generator.load_weights(self.trainer_address, step.policy_version)
        t4 = time.perf_counter()
        stats = dict(step.stats)
        stats["env/score_mean"] = sum(s.score for s in scores.scores) / len(scores.scores)
        texts = [s.text for s in response.samples]
        record = {
            "cycle": index,
            "reward_mean": stats["env/reward_mean"],
            "kl": stats["objective/kl"],
            "policy_version": step.policy_version,
            "rollout_policy_version": response.policy_version,
            "seconds": t4 - t0,
            "samples": len(rollouts),
            "time/rollout": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2, "time/weight_sync": t4 - t3,
            **guard_figures(texts),
            **stats,
        }
        record["examples"] = [response.samples[i].full_text for i in (0, len(response.samples) // 2)]
        return record

    def check_guards(self, record: dict) -> list[str]:
        a = self.args
        warnings = []
        if record["kl"] > a.max_kl:
            warnings.append(f"KL {record['kl']:.2f} nats/seq above --max-kl {a.max_kl}")
        if self.start_distinct2 and record["distinct2"] < a.min_distinct2_ratio * self.start_distinct2:
            warnings.append(f"distinct-2 {record['distinct2']:.3f} below {a.min_distinct2_ratio:.2f}x "
                            f"the start ({self.start_distinct2:.3f})")
        if record["repetition_rate"] > a.max_repetition_rate:
            warnings.append(f"repetition rate {record['repetition_rate']:.2f} above --max-repetition-rate "
                            f"{a.max_repetition_rate}")
        return warnings

    def run(self, start_cycle: int = 0) -> list[dict]:
        a = self.args
        before = self.write_samples("samples_before.jsonl")
        self.start_distinct2 = text_metrics.distinct_n([r["response"] for r in before], 2)
        log.info("before training: mean reward %.3f over %d samples", _mean(r["reward"] for r in before), len(before))
        records: list[dict] = []
        started = time.perf_counter()
        with open(self.run_dir / "cycles.jsonl", "a", encoding="utf-8") as out:
            for index in range(start_cycle, start_cycle + a.cycles):
                record = self.cycle(index)
                record["elapsed"] = time.perf_counter() - started
                records.append(record)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                print(f"cycle {index:3d}  reward {record['reward_mean']:.3f}  kl {record['kl']:6.2f}  "
                      f"kl_coef {record['objective/kl_coef']:.3f}  distinct2 {record['distinct2']:.2f}  "
                      f"v{record['policy_version']}  {record['seconds']:.1f}s", flush=True)
                for example in record["examples"]:
                    print(f"    {example}", flush=True)
                for warning in self.check_guards(record):
                    log.warning("guard: %s", warning)
                if a.max_seconds and record["elapsed"] >= a.max_seconds:
                    log.info("stopping after %d cycles: --max-seconds %.0f reached", len(records), a.max_seconds)
                    break
        after = self.write_samples("samples_after.jsonl")
        log.info("after training: mean reward %.3f over %d samples", _mean(r["reward"] for r in after), len(after))
        plot_reward_kl(records, self.run_dir / "reward_kl.png", title=f"haoping run {self.run_dir.name}")
        saved = self.trainer.save_checkpoint(str(self.run_dir / "checkpoint"))
        log.info("final policy (version %d) saved to %s/policy", saved.policy_version, saved.directory)
        return records


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
    add_flag(parser, "--scorer-model", "starter:classifier", help="scorer model: starter:classifier, a dir or a hub ID")
    add_flag(parser, "--scorer-normalize", "none",
             help="older name of --reward-normalization (none, sigmoid or running), applied by the trainer")
    add_flag(parser, "--score-timeout", 600.0, float,
             "seconds each Score request may take (the human backend waits for a person's ratings)")
    add_flag(parser, "--ppo-config", "", help="JSON object of PPO options passed to the trainer; a typed "
             "PPO option flag below overrides its key")
    add_flag(parser, "--resume", "", help="trainer checkpoint dir to resume from (e.g. runs/latest/checkpoint)")
    add_flag(parser, "--generator-replicas", 1, int,
             "generator processes; each rollout's samples are split across them and run concurrently")
    add_flag(parser, "--device", "auto", help="torch device for all services")
    add_flag(parser, "--dtype", "float32", help="float32, bfloat16 or float16")
    add_flag(parser, "--max-kl", 6.0, float, "guard: warn when KL (nats/seq) goes above")
    add_flag(parser, "--min-distinct2-ratio", 0.5, float, "guard: warn when distinct-2 falls below this x start")
    add_flag(parser, "--max-repetition-rate", 0.1, float, "guard: warn when this share of responses repeats a char 4x")
    add_flag(parser, "--trainer-address", "",
             help="host:port of a running trainer: use the running services (with --generator-addresses and "
                  "--scorer-address, e.g. under docker compose) instead of starting them")
    add_flag(parser, "--generator-addresses", "", help="comma-separated host:port of running generators")
    add_flag(parser, "--scorer-address", "", help="host:port of a running scorer")
    add_client_access_flags(parser, token_help="the running services' token file (default: the services this run "
                                               "starts get a fresh random token in <run dir>/auth-token, mode 0600)")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="rollout prompts")
    # the trainer's options; --seed and --min-new-tokens above set its seed and EOS minimum
    add_dataclass_flags(parser, PPOConfig, skip=RUN_SET_OPTIONS, group_title="PPO options (the trainer's PPOConfig)")


RUN_SET_OPTIONS = ("seed", "min_response_tokens")
PPO_OPTION_NAMES = [f.name for f in fields(PPOConfig) if f.name not in RUN_SET_OPTIONS]


# flags that configure the services a run starts; running services were configured by their own flags
SERVICE_FLAGS = ("policy", "scorer_backend", "scorer_model", "scorer_normalize", "ppo_config", "resume",
                 "generator_replicas", "device", "dtype")


def running_services(args) -> tuple[str, list[str], str] | None:
    """(trainer, generators, scorer) addresses when the run uses running services, else None.
    Raises ValueError for a partial set, or with flags that only configure services it would start."""
    given = [args.trainer_address, args.generator_addresses, args.scorer_address]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--trainer-address, --generator-addresses and --scorer-address go together")
    defaults = vars(build_parser_defaults())
    changed = [f"--{name.replace('_', '-')}" for name in SERVICE_FLAGS if getattr(args, name) != defaults[name]]
    changed += [f"--{name.replace('_', '-')}" for name in dataclass_flag_values(args, PPO_OPTION_NAMES)]
    if changed:
        raise ValueError(f"{', '.join(changed)} configure services this run starts; running services take "
                         "their settings from their own flags")
    return args.trainer_address, [a.strip() for a in args.generator_addresses.split(",") if a.strip()], \
        args.scorer_address


def build_parser_defaults() -> argparse.Namespace:
    """The run flags' defaults, env fallbacks included."""
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return parser.parse_args([])


def run(args) -> int:
    name = args.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = Path(args.runs_dir)
    run_dir = runs_dir / name
    if (run_dir / "cycles.jsonl").exists() and not args.resume:
        print(f"error: {run_dir} already holds a run; pick another --name or pass --resume", file=sys.stderr)
        return 2
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        print(f"error: --min-new-tokens {args.min_new_tokens} must be in [0, --max-new-tokens {args.max_new_tokens}]",
              file=sys.stderr)
        return 2
    if args.generator_replicas < 1:
        print(f"error: --generator-replicas must be >= 1, got {args.generator_replicas}", file=sys.stderr)
        return 2
    try:
        connect_to = running_services(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.auth_token_file and not os.access(args.auth_token_file, os.R_OK):
        print(f"error: --auth-token-file {args.auth_token_file} cannot be read", file=sys.stderr)
        return 2
    if args.resume and not (Path(args.resume) / "trainer_state.json").exists():
        print(f"error: --resume {args.resume} is not a trainer checkpoint (no trainer_state.json)", file=sys.stderr)
        return 2
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    latest = runs_dir / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(name)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (run_dir / "config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))

    from haoping.bootstrap import ensure_starter_models

    if connect_to is None and any(ref.startswith("starter:") for ref in (args.policy, args.scorer_model)):
        ensure_starter_models()  # once, here, with progress bars, before the services race for it
    # services this run starts get a fresh token; running ones take the token they were given
    token_file = Path(args.auth_token_file) if args.auth_token_file else None
    if connect_to is None and token_file is None:
        token_file = write_token_file(run_dir / "auth-token")
    services: list[ServiceProcess] = []
    try:
        if connect_to is None:
            log.info("starting services (logs in %s)", run_dir / "logs")
            start_services(args, run_dir, services, token_file)
            for s in services:
                log.info("%s serving at %s (metrics http://%s:%d/metrics)", s.name, s.address,
                         s.address.split(":")[0], s.metrics_port)
            trainer_service, generator_services, scorer_service = split_services(services)
            connect_to = trainer_service.address, [g.address for g in generator_services], scorer_service.address
        trainer_address, generator_addresses, scorer_address = connect_to
        access = {**client_access(args), "token_file": token_file}
        with GeneratorReplicas([GeneratorClient(a, **access) for a in generator_addresses]) as generator, \
                ScorerClient(scorer_address, timeout=args.score_timeout, **access) as scorer, \
                TrainerClient(trainer_address, **access) as trainer:
            try:
                synced = generator.load_weights(trainer_address)  # a resumed trainer's policy, or the same start
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                print(f"error: {err.code().name}: {err.details()}\n(pass the services' token file with "
                      "--auth-token-file)", file=sys.stderr)
                return 2
            start_cycle = _cycles_done(run_dir) if args.resume else 0
            log.info("%d generator(s) at policy version %d; running %d cycles", len(generator_addresses),
                     synced.policy_version, args.cycles)
            records = Coordinator(args, generator, scorer, trainer, trainer_address, run_dir).run(start_cycle)
        first, last = records[:5], records[-5:]
        print(f"mean reward, first {len(first)} cycles {_mean(r['reward_mean'] for r in first):.3f} -> "
              f"last {len(last)} cycles {_mean(r['reward_mean'] for r in last):.3f}; run dir {run_dir}")
        return 0
    finally:
        stop_services(services)


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


def start_services(args, run_dir: Path, services: list[ServiceProcess], token_file: Path | None = None) -> None:
    """Start the trainer, ``--generator-replicas`` generators and the scorer, appending each to
    ``services`` as soon as it serves (so the caller can stop whatever did start); all take
    ``token_file``."""
    common = ["--device", args.device, "--dtype", args.dtype]
    trainer_args = ["--model", args.policy, "--ppo-config", json.dumps(trainer_ppo_config(args)),
                    "--checkpoint-dir", str(run_dir / "checkpoint"), *common]
    if args.resume:
        trainer_args += ["--resume", args.resume]
    services.append(start_service("trainer", trainer_args, run_dir, token_file=token_file))
    # replicas keep torch's default threads: the same thread count gives bit-identical samples,
    # so a rollout does not depend on how many replicas share it
    generator_args = ["--model", args.policy, *common, "--trainer-address", services[0].address]
    for replica in range(args.generator_replicas):
        label = "generator" if replica == 0 else f"generator-{replica + 1}"
        services.append(start_service("generator", generator_args, run_dir, label=label, token_file=token_file))
    services.append(start_service("scorer", ["--backend", args.scorer_backend, "--model", args.scorer_model,
                                             *common], run_dir, token_file=token_file))


def split_services(services: list[ServiceProcess]) -> tuple[ServiceProcess, list[ServiceProcess], ServiceProcess]:
    """(trainer, generators, scorer) from the list :func:`start_services` filled."""
    return services[0], services[1:-1], services[-1]


def _cycles_done(run_dir: Path) -> int:
    path = run_dir / "cycles.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return (lines[-1]["cycle"] + 1) if lines else 0
