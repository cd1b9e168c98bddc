"""`make bench-peer`: haoping against TRL on the same task, machine and training budget.

Back to back, each for the same budget of training seconds (model loading and warm-up excluded
on both sides): TRL GRPOTrainer (trl 1.16, its own venv), TRL PPOTrainer (trl 1.12, the last
release with it, its own venv), and each haoping algorithm through `python -m bench.learning`.
Then every final policy, and the starter policy, writes the same held-out samples, scored alike.
Writes bench/peer.json and prints a table and the issue's targets (see docs/peer.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.peer import metrics
from haoping.atomic import atomic_write_json
from haoping.checkpoint import policy_of
from services.common.config import add_flag

REPO = Path(__file__).resolve().parents[2]
VENVS = REPO / "bench" / "peer" / ".venvs"
TRL_VENVS = {"trl-grpo": VENVS / "trl-1.16", "trl-ppo": VENVS / "trl-1.12"}
TRL_MODULES = {"trl-grpo": "bench.peer.trl_grpo", "trl-ppo": "bench.peer.trl_ppo"}
# bench-learning's settings (Makefile LEARNING_ARGS) unless --learning-args says otherwise
DEFAULT_LEARNING_ARGS = "--cycles 100000 --eval-samples 512"
# PPO's bench-learning settings (Makefile: make bench-learning ALGORITHM_ARGS=...), used when PPO
# is not the default algorithm whose tuned settings LEARNING_ARGS carries
PPO_ARGS = ("--cycles 100000 --eval-samples 512 --algorithm ppo --samples-per-prompt 32 --minibatch-size 64 "
            "--init-kl-coef 0.1 --learning-rate 0.001")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    add_flag(parser, "--budget-seconds", 300.0, float, "training seconds per run")
    add_flag(parser, "--runs", "", help="comma-separated runs (default: trl-grpo, trl-ppo and haoping-<each algorithm>)")
    add_flag(parser, "--heldout-samples", 512, int, "held-out samples per final policy")
    add_flag(parser, "--threads", 2, int, "torch threads in every process")
    add_flag(parser, "--seed", 0, int, "training seed of every run")
    add_flag(parser, "--grpo-samples-per-step", 64, int, "TRL GRPO rollouts a step (a multiple of the prompts)")
    add_flag(parser, "--grpo-beta", 0.1, float, "TRL GRPO's KL coefficient")
    add_flag(parser, "--ppo-samples-per-step", 128, int, "TRL PPO rollouts a step (as bench-learning's 4 x 32)")
    add_flag(parser, "--ppo-kl-coef", 0.1, float, "TRL PPO's KL coefficient (haoping PPO's initial one)")
    add_flag(parser, "--learning-rate", 1e-3, float, "TRL runs' learning rate (haoping's is in --learning-args)")
    add_flag(parser, "--learning-args", DEFAULT_LEARNING_ARGS,
             help="python -m bench.learning arguments of the default algorithm's run (make: LEARNING_ARGS); "
                  "another critic-free algorithm's run takes them with its own --algorithm")
    add_flag(parser, "--ppo-args", PPO_ARGS, help="python -m bench.learning arguments of the PPO run when PPO is "
             "not the default algorithm")
    add_flag(parser, "--run-dir", "bench/run/peer", help="where each run's directory goes")
    add_flag(parser, "--out", "bench/peer.json", help="the results file")
    add_flag(parser, "--label", "", help="a note stored with the results (e.g. 'reduced budget')")
    return parser


def haoping_algorithms() -> tuple[list[str], str, bool]:
    """haoping run's --algorithm choices, its default, and whether the flag exists at all
    (before it did, PPO was the only algorithm)."""
    from services.coordinator.run import add_run_flags

    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    for action in parser._actions:
        if "--algorithm" in action.option_strings:
            from haoping.ppo_trainer import PPOConfig

            default = PPOConfig().algorithm if action.default == argparse.SUPPRESS else action.default
            return list(action.choices or [default]), default, True
    return ["ppo"], "ppo", False


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory,
            "python": platform.python_version()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_env(threads: int) -> dict:
    env = os.environ.copy()
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def haoping_steps(cycles_path: Path) -> list[dict]:
    """bench-learning's cycles.jsonl as step records; its clock is the sum of cycle times
    (rollout + score + update + weight sync), as bench/learning.py summarizes it."""
    steps, clock = [], 0.0
    for i, line in enumerate(cycles_path.read_text(encoding="utf-8").splitlines()):
        r = json.loads(line)
        clock += r["seconds"]
        steps.append({"step": i, "seconds": clock, "samples": r["samples"], "reward_mean": r["reward_mean"],
                      "kl": r["kl"], "distinct2": r["distinct2"], "repetition_rate": r["repetition_rate"],
                      "empty_rate": r.get("empty_rate", 0.0), "examples": r.get("examples", [])})
    return steps


def run_trl(name: str, run_dir: Path, settings: dict, args) -> dict:
    python = TRL_VENVS[name] / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make bench-peer`, which installs the TRL venvs")
    config = {**settings, "run_dir": str(run_dir), "learning_rate": args.learning_rate}
    if name == "trl-grpo":
        config.update(samples_per_step=args.grpo_samples_per_step, beta=args.grpo_beta)
    else:
        config.update(samples_per_step=args.ppo_samples_per_step, kl_coef=args.ppo_kl_coef, ppo_epochs=4,
                      ppo_minibatches=max(1, args.ppo_samples_per_step // 64))
    atomic_write_json(run_dir / "config.json", config)
    command = [str(python), "-m", TRL_MODULES[name], "--config", str(run_dir / "config.json")]
    _run(command, run_dir, args.threads, cwd=REPO)
    result = json.loads((run_dir / "result.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text(encoding="utf-8").splitlines()]
    return {**result, "steps": steps, "policy": str(run_dir / "policy"), "config": config}


def run_haoping(algorithm: str, run_dir: Path, args, with_flag: bool, peer_seconds_to_0_90: float | None,
                default_algorithm: str) -> dict:
    out = run_dir / "bench-learning"
    chosen = args.ppo_args if algorithm == "ppo" and default_algorithm != "ppo" else args.learning_args
    learning = ["--run-dir", str(out)] + shlex.split(chosen) + [
        "--max-seconds", str(args.budget_seconds), "--seed", str(args.seed)]
    if peer_seconds_to_0_90 is not None:  # bench.learning's own verdict then uses this run's TRL GRPO time
        learning += ["--peer-seconds-to-0-90", f"{peer_seconds_to_0_90:.3f}"]
    if with_flag:
        learning += ["--algorithm", algorithm]
    command = [sys.executable, "-m", "bench.learning", *learning]
    _run(command, run_dir, args.threads, cwd=REPO)
    return {"steps": haoping_steps(out / "cycles.jsonl"), "policy": str(policy_of(out)),
            "config": {"command": command}, "bench_learning_summary": json.loads((out / "summary.json").read_text())}


def _run(command: list[str], run_dir: Path, threads: int, cwd: Path) -> None:
    print(f"$ {shlex.join(command)}", flush=True)
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(threads), cwd=cwd)
    if code:
        tail = "\n".join((run_dir / "log.txt").read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{command[2]} exited with {code}; {run_dir / 'log.txt'} ends:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    from haoping.log import setup_logging
    from haoping.models import resolve_model
    from services.coordinator.run import DEFAULT_PROMPTS

    setup_logging()
    args = build_parser().parse_args(argv)
    algorithms, default_algorithm, with_flag = haoping_algorithms()
    from bench.learning import run_algorithm

    # "haoping's default" is bench-learning's: the algorithm its LEARNING_ARGS choose
    default_algorithm = run_algorithm(shlex.split(args.learning_args)) if with_flag else default_algorithm
    available = ["trl-grpo", "trl-ppo"] + [f"haoping-{a}" for a in algorithms]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] or available
    unknown = [r for r in runs if r not in available]
    if unknown:
        print(f"error: unknown runs {', '.join(unknown)}; choose from {', '.join(available)}", file=sys.stderr)
        return 2
    if args.budget_seconds <= 0 or args.heldout_samples < 1 or args.threads < 1:
        print("error: --budget-seconds, --heldout-samples and --threads must be positive", file=sys.stderr)
        return 2
    settings = {"prompts": DEFAULT_PROMPTS, "max_new_tokens": 16, "min_new_tokens": 8, "threads": args.threads,
                "seed": args.seed, "budget_seconds": args.budget_seconds, "empty_response_reward": 0.0,
                "policy": resolve_model("starter:policy"), "classifier": resolve_model("starter:classifier")}
    root = Path(args.run_dir)
    started = datetime.now(timezone.utc)
    load_start = load_average()
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name in runs:
        run_dir = (root / name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("steps.jsonl", "result.json"):
            (run_dir / stale).unlink(missing_ok=True)
        load_before, t0 = load_average(), time.perf_counter()
        print(f"\n== {name}: {args.budget_seconds:.0f} s of training (load {load_before})", flush=True)
        try:
            if name in TRL_VENVS:
                result = run_trl(name, run_dir, settings, args)
            else:
                grpo = metrics.summarize(results["trl-grpo"]["steps"]) if "trl-grpo" in results else None
                peer_t90 = ((grpo or {}).get("reached") or {}).get("0.90")
                result = run_haoping(name.removeprefix("haoping-"), run_dir, args, with_flag,
                                     peer_t90["seconds"] if peer_t90 else None, default_algorithm)
        except (RuntimeError, OSError, ValueError, KeyError) as err:  # one broken run must not void the rest
            print(f"== {name} FAILED: {err}", flush=True)
            failures[name] = str(err)
            continue
        result.update(load_before=load_before, load_after=load_average(), wall_seconds=time.perf_counter() - t0)
        results[name] = result
        s = metrics.summarize(result["steps"])
        print(f"== {name}: {s['steps']} steps, {s['samples']} samples in {s['seconds']:.1f} s "
              f"({s['samples_per_second']:.0f}/s), reward {s['reward_start']:.3f} -> {s['end']['reward']:.3f}",
              flush=True)

    print(f"\n== held-out: {args.heldout_samples} samples per policy, same prompts and seeds", flush=True)
    from bench.peer.heldout import evaluate
    from haoping.scorers.classifier import ClassifierScorer

    scorer = ClassifierScorer(settings["classifier"])

    def heldout(policy: str) -> dict:
        return evaluate(policy, scorer, settings["prompts"], args.heldout_samples, settings["max_new_tokens"],
                        settings["min_new_tokens"], settings["empty_response_reward"])

    heldout_start = heldout(settings["policy"])
    summaries = {}
    for name, result in results.items():
        result["heldout"] = heldout(result["policy"])
        summaries[name] = metrics.summarize(result["steps"], result["heldout"], heldout_start)
    default_run = f"haoping-{default_algorithm}"
    verdict = metrics.verdict(summaries, default_run)
    table = metrics.table(summaries)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "label": args.label,
        "machine": machine(),
        "load_start": load_start,
        "load_end": load_average(),
        "budget_seconds": args.budget_seconds,
        "settings": {k: v for k, v in settings.items() if k not in ("policy", "classifier")},
        "default_run": default_run,
        "heldout_start": heldout_start,
        "runs": {name: {"summary": summaries[name],
                        "steps": [{k: v for k, v in s.items() if k != "examples"} for s in result["steps"]],
                        **{k: v for k, v in result.items() if k not in ("steps",)}}
                 for name, result in results.items()},
        "failed": failures,
        "table": table,
        "verdict": [{"target": what, "measured": value, "met": met} for what, value, met in verdict],
    }
    atomic_write_json(args.out, report)
    print(f"\n{args.label + ': ' if args.label else ''}{report['date']}, {report['machine']['cpu']}, "
          f"{report['machine']['cores']} cores; load {report['load_start']} at the start, {report['load_end']} at the end")
    print(f"held-out start (starter policy): reward {heldout_start['reward_mean']:.3f}, "
          f"distinct-2 {heldout_start['distinct2']:.3f}, repetition {heldout_start['repetition_rate']:.1%}\n")
    print(table)
    print()
    for what, value, met in verdict:
        print(f"{'MET ' if met else 'MISS'} {what}: {value}")
    for name, err in failures.items():
        print(f"FAILED {name}: {err.splitlines()[0]}")
    print(f"\nresults: {args.out}; runs: {root}")
    return 1 if failures else 0

