"""`make bench-learning`: one algorithm (``--algorithm ppo|grpo|rloo``) on the starter models with
fixed seeds; how fast and how honestly the reward rises. Runs the real services through the
coordinator (``haoping run``), then writes a JSON summary and prints a per-cycle table.

Usage: ``python -m bench.learning [--summary-out PATH] [--run-dir DIR] [--peer-seconds-to-0-90 S]
<haoping run flags>``, e.g. ``--algorithm grpo --max-seconds 300 --samples-per-prompt 16``. Every
flag this module does not know goes to ``haoping run`` unchanged (``--max-seconds`` is the
training budget; ``haoping run --help`` lists the rest, PPO options included).

Definitions (the same for every algorithm and for a peer harness reading this summary):
* training seconds: the sum of the cycles' wall times (rollout + score + update + weight sync),
  the start-up and the before/after samples excluded; samples: rollouts trained on.
* reward: the rollouts' mean raw score per cycle (the starter classifier's P(positive)),
  smoothed as a 3-cycle moving mean; "reaching 0.90" is that mean's first cycle >= 0.90.
* KL: haoping's definition, sum over response tokens of log p_policy - log p_ref (k1) of the
  sampled tokens, mean over the cycle's rollouts, nats per sequence; 3-cycle moving mean.
* distinct-2: distinct character bigrams / all bigrams over the cycle's responses; repetition:
  share of responses repeating a character 4 times in a row. Both 3-cycle moving means of the
  rollouts; "ratio" is against the first cycle's (the starting policy's) value.
* held-out: ``--eval-samples`` samples drawn with a fixed seed before and after training
  (samples_before/after.jsonl), scored by the same scorer.

Summary keys (JSON object; a figure that does not exist, e.g. a threshold never reached, is null):
  algorithm, cycles, samples_per_cycle, samples, train_seconds, samples_per_second,
  reward_start                      3-cycle mean at the first cycle
  seconds_to_reward_0_80 / _0_85 / _0_90, samples_to_reward_0_80 / _0_85 / _0_90, cycle_at_0_90
  kl_at_0_90, distinct2_ratio_at_0_90, repetition_rate_at_0_90, distinct2_at_0_90
  final_reward_mean, kl_end, rollouts_distinct2_ratio_end, rollouts_repetition_rate_end
                                    (the last cycle's 3-cycle means of the rollouts)
  distinct2_rollouts_start          first cycle's distinct-2
  heldout_samples, samples_reward_before, samples_reward_after   held-out mean reward before/after
  distinct2_start, distinct2_end, repetition_rate_end, empty_rate_end   held-out texts before/after
  kl_max                            largest 3-cycle mean KL of the run
  guards_hold_to_end                KL, distinct-2 ratio and repetition within the targets at every
                                    cycle from reaching 0.90 to the end
  targets                           the thresholds used; verdict: [{name, value, met}]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from haoping import text_metrics

RUN_DIR = Path("runs/bench-learning")
THRESHOLDS = (0.80, 0.85, 0.90)
# TRL 1.16 GRPOTrainer on this task and machine reached 0.90 in 4.2 s of training
TARGETS = {"reward": 0.90, "seconds_ratio_to_peer": 0.5, "peer_seconds_to_0_90": 4.2, "kl": 6.0,
           "distinct2_ratio": 0.5, "repetition": 0.10, "heldout_reward": 0.90}


def rolling_mean(values: list[float], window: int = 3) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _key(threshold: float) -> str:
    return f"{threshold:.2f}".replace(".", "_")


def summarize(records: list[dict], before: list[dict], after: list[dict], algorithm: str = "ppo",
              targets: dict = TARGETS) -> dict:
    """records: cycles.jsonl rows; before/after: held-out samples files. Keys: see the module doc."""
    rewards = rolling_mean([r["reward_mean"] for r in records])
    kls = rolling_mean([r["kl"] for r in records])
    distinct2 = rolling_mean([r["distinct2"] for r in records])
    repetition = rolling_mean([r["repetition_rate"] for r in records])
    elapsed, samples, clock, count = [], [], 0.0, 0
    for r in records:
        clock += r["seconds"]
        count += r["samples"]
        elapsed.append(clock)
        samples.append(count)
    start_d2 = distinct2[0] if distinct2 else None

    def first_reaching(threshold: float) -> int | None:
        return next((i for i, value in enumerate(rewards) if value >= threshold), None)

    def ratio(value: float | None) -> float | None:
        return value / max(start_d2, 1e-9) if value is not None and start_d2 is not None else None

    summary: dict = {"algorithm": algorithm, "cycles": len(records),
                     "samples_per_cycle": records[0]["samples"] if records else 0,
                     "samples": count, "train_seconds": clock,
                     "samples_per_second": count / clock if clock else None,
                     "reward_start": rewards[0] if rewards else None}
    for threshold in THRESHOLDS:
        at = first_reaching(threshold)
        summary[f"seconds_to_reward_{_key(threshold)}"] = elapsed[at] if at is not None else None
        summary[f"samples_to_reward_{_key(threshold)}"] = samples[at] if at is not None else None
    at_90 = first_reaching(0.90)
    pick = lambda series: series[at_90] if at_90 is not None else None  # noqa: E731
    before_texts = [s["response"] for s in before]
    after_texts = [s["response"] for s in after]
    guards = [kls[i] <= targets["kl"] and ratio(distinct2[i]) >= targets["distinct2_ratio"]
              and repetition[i] <= targets["repetition"] for i in range(at_90 or 0, len(records))]
    summary.update({
        "cycle_at_0_90": records[at_90]["cycle"] if at_90 is not None else None,
        "kl_at_0_90": pick(kls),
        "distinct2_at_0_90": pick(distinct2),
        "distinct2_ratio_at_0_90": ratio(pick(distinct2)),
        "repetition_rate_at_0_90": pick(repetition),
        "final_reward_mean": rewards[-1] if rewards else None,
        "kl_end": kls[-1] if kls else None,
        "kl_max": max(kls) if kls else None,
        "rollouts_distinct2_ratio_end": ratio(distinct2[-1]) if distinct2 else None,
        "rollouts_repetition_rate_end": repetition[-1] if repetition else None,
        "distinct2_rollouts_start": start_d2,
        "guards_hold_to_end": at_90 is not None and all(guards),
        "heldout_samples": len(after),
        "samples_reward_before": sum(s["reward"] for s in before) / len(before) if before else None,
        "samples_reward_after": sum(s["reward"] for s in after) / len(after) if after else None,
        "distinct2_start": text_metrics.distinct_n(before_texts, 2),
        "distinct2_end": text_metrics.distinct_n(after_texts, 2),
        "repetition_rate_end": text_metrics.repetition_rate(after_texts),
        "empty_rate_end": text_metrics.empty_rate(after_texts),
        "targets": targets,
    })
    summary["verdict"] = [{"name": n, "value": v, "met": m} for n, v, m in verdict(summary, targets)]
    return summary


def verdict(summary: dict, targets: dict = TARGETS) -> list[tuple[str, str, bool]]:
    """The targets: at the moment the 3-cycle mean reward first reaches 0.90, and at the end (the
    guards still holding there, so only a run that reached 0.90 can meet them)."""
    t90 = summary["seconds_to_reward_0_90"]
    reached = t90 is not None
    limit = targets["seconds_ratio_to_peer"] * targets["peer_seconds_to_0_90"]
    fmt = lambda key, pattern: pattern.format(summary[key]) if summary[key] is not None else "-"  # noqa: E731
    end_ok = (reached and summary["kl_end"] is not None and summary["kl_end"] <= targets["kl"]
              and summary["rollouts_distinct2_ratio_end"] >= targets["distinct2_ratio"]
              and summary["rollouts_repetition_rate_end"] <= targets["repetition"])
    return [
        (f"reward 0.90 within {limit:.1f} s of training", f"{t90:.1f}s" if reached else "never",
         reached and t90 <= limit),
        ("KL at 0.90 <= 6 nats/seq", fmt("kl_at_0_90", "{:.2f}"),
         reached and summary["kl_at_0_90"] <= targets["kl"]),
        ("distinct-2 at 0.90 >= 0.5x start", fmt("distinct2_ratio_at_0_90", "{:.2f}x"),
         reached and summary["distinct2_ratio_at_0_90"] >= targets["distinct2_ratio"]),
        ("repetition rate at 0.90 <= 10%", fmt("repetition_rate_at_0_90", "{:.1%}"),
         reached and summary["repetition_rate_at_0_90"] <= targets["repetition"]),
        ("end: KL <= 6, distinct-2 >= 0.5x, repetition <= 10%",
         f"KL {fmt('kl_end', '{:.2f}')}, {fmt('rollouts_distinct2_ratio_end', '{:.2f}x')}, "
         f"{fmt('rollouts_repetition_rate_end', '{:.1%}')}", end_ok),
        ("held-out reward at the end >= 0.90", fmt("samples_reward_after", "{:.3f}"),
         reached and summary["samples_reward_after"] >= targets["heldout_reward"]),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.split("\n\n")[0],
                                     add_help=False)
    parser.add_argument("--summary-out", default="", help="also write the JSON summary here")
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="the run directory (replaced)")
    parser.add_argument("--peer-seconds-to-0-90", type=float, default=TARGETS["peer_seconds_to_0_90"],
                        help="the peer's (TRL GRPO's) training seconds to 0.90; the target is 0.5x it")
    parser.add_argument("--bench-help", action="help", help="this help (--help is haoping run's)")
    return parser


def run_algorithm(run_args: list[str]) -> str:
    """The --algorithm the run will use (haoping run's default when not given)."""
    from services.coordinator.run import add_run_flags

    parser = argparse.ArgumentParser(add_help=False)
    add_run_flags(parser)
    args, _ = parser.parse_known_args(run_args)
    if getattr(args, "algorithm", None):
        return args.algorithm
    ppo_config = json.loads(args.ppo_config) if args.ppo_config else {}
    return ppo_config.get("algorithm", "ppo")


def main(argv: list[str] | None = None) -> int:
    from services.cli import main as haoping_main

    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args, run_args = build_parser().parse_known_args(argv)
    run_dir = Path(bench_args.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    code = haoping_main(["run", "--name", run_dir.name, "--runs-dir", str(run_dir.parent), *run_args])
    if code:
        return code
    records = [json.loads(line) for line in (run_dir / "cycles.jsonl").read_text().splitlines()]
    read = lambda name: [json.loads(line) for line in (run_dir / name).read_text().splitlines()]  # noqa: E731
    targets = {**TARGETS, "peer_seconds_to_0_90": bench_args.peer_seconds_to_0_90}
    summary = summarize(records, read("samples_before.jsonl"), read("samples_after.jsonl"),
                        run_algorithm(run_args), targets)
    text = json.dumps(summary, indent=2)
    (run_dir / "summary.json").write_text(text)
    if bench_args.summary_out:
        Path(bench_args.summary_out).parent.mkdir(parents=True, exist_ok=True)
        Path(bench_args.summary_out).write_text(text)
    print(f"\n{'cycle':>5} {'train s':>7} {'samples':>7} {'reward':>7} {'3-mean':>7} {'kl':>6} {'distinct2':>9} "
          f"{'repeat':>7}")
    rewards = rolling_mean([r["reward_mean"] for r in records])
    clock, count = 0.0, 0
    for r, mean in zip(records, rewards):
        clock += r["seconds"]
        count += r["samples"]
        print(f"{r['cycle']:5d} {clock:7.1f} {count:7d} {r['reward_mean']:7.3f} {mean:7.3f} {r['kl']:6.2f} "
              f"{r['distinct2']:9.3f} {r['repetition_rate']:7.2f}")
    print(f"\n{summary['algorithm']}: {summary['samples_per_second'] or 0:.0f} samples/s; to 0.80/0.85/0.90: "
          + " / ".join(f"{summary[f'seconds_to_reward_{_key(t)}']:.1f}s ({summary[f'samples_to_reward_{_key(t)}']})"
                       if summary[f"seconds_to_reward_{_key(t)}"] is not None else "never" for t in THRESHOLDS)
          + f"; held-out reward {summary['samples_reward_before']:.3f} -> {summary['samples_reward_after']:.3f}")
    for name, value, met in verdict(summary, targets):
        print(f"{'MET ' if met else 'MISS'} {name}: {value}")
    print(f"summary: {run_dir / 'summary.json'}" + (f" and {bench_args.summary_out}" if bench_args.summary_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
