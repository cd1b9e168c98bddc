"""The figures `make bench-peer` reports, as pure functions of per-step records.

Every run, haoping's or TRL's, is reduced to the same records (one per training step):
``{"step", "seconds", "samples", "reward_mean", "kl", "distinct2", "repetition_rate"}`` where
``seconds`` is the training clock at the end of the step (cumulative; model loading and warm-up
excluded), ``samples`` the rollouts of that step, ``kl`` haoping's objective/kl (nats per
sequence, see :func:`sequence_kl`) and the guard figures are over that step's response texts.
No torch, no TRL: the harness's main process and the tests import this in any venv.
"""
from __future__ import annotations

THRESHOLDS = (0.80, 0.85, 0.90)
WINDOW = 3  # steps in the moving mean, as bench/learning.py
# the issue's targets (also bench/learning.py TARGETS)
MAX_KL, MIN_DISTINCT2_RATIO, MAX_REPETITION, MIN_HELDOUT_REWARD = 6.0, 0.5, 0.10, 0.90
MAX_TIME_RATIO_TO_GRPO, MIN_SPEED_RATIO_TO_PPO = 0.5, 2.0


def moving_mean(values: list[float], window: int = WINDOW) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def first_crossing(values: list[float], threshold: float) -> int | None:
    """Index of the first value >= threshold, or None."""
    return next((i for i, value in enumerate(values) if value >= threshold), None)


def sequence_kl(logp: list[list[float]], ref_logp: list[list[float]]) -> list[float]:
    """haoping's objective/kl per sequence: the sum over its response tokens of
    log pi(token) - log pi_ref(token) under the sampled tokens (k1, nats/seq).
    ``logp``/``ref_logp``: one list per sequence, real response tokens only."""
    if len(logp) != len(ref_logp):
        raise ValueError(f"{len(logp)} policy rows but {len(ref_logp)} reference rows")
    out = []
    for i, (row, ref_row) in enumerate(zip(logp, ref_logp)):
        if len(row) != len(ref_row):
            raise ValueError(f"row {i}: {len(row)} policy tokens but {len(ref_row)} reference tokens")
        out.append(sum(a - b for a, b in zip(row, ref_row)))
    return out


def _ratio(value: float | None, start: float | None) -> float | None:
    if value is None or not start:
        return None
    return value / start


def summarize(steps: list[dict], heldout: dict | None = None, heldout_start: dict | None = None) -> dict:
    """One run's figures from its step records (and its final policy's held-out samples).

    ``heldout``/``heldout_start``: {"reward_mean", "distinct2", "repetition_rate", ...} of the
    final and the initial policy on the same held-out prompts and seeds."""
    if not steps:
        raise ValueError("no steps recorded")
    rewards = moving_mean([s["reward_mean"] for s in steps])
    kls = moving_mean([s["kl"] for s in steps])
    distinct2 = moving_mean([s["distinct2"] for s in steps])
    repetition = moving_mean([s["repetition_rate"] for s in steps])
    cumulative, total = [], 0
    for s in steps:
        total += s["samples"]
        cumulative.append(total)
    seconds = steps[-1]["seconds"]
    start_distinct2 = distinct2[0]

    def moment(i: int) -> dict:
        return {"step": steps[i]["step"], "seconds": steps[i]["seconds"], "samples": cumulative[i],
                "reward": rewards[i], "kl": kls[i], "distinct2": distinct2[i],
                "distinct2_ratio": _ratio(distinct2[i], start_distinct2), "repetition_rate": repetition[i]}

    summary = {
        "steps": len(steps),
        "samples": total,
        "samples_per_step": steps[0]["samples"],
        "seconds": seconds,
        "samples_per_second": total / seconds if seconds > 0 else None,
        "reward_start": rewards[0],
        "distinct2_start": start_distinct2,
        "reached": {},
        "at_0_90": None,
        "end": moment(len(steps) - 1),
    }
    for threshold in THRESHOLDS:
        i = first_crossing(rewards, threshold)
        summary["reached"][f"{threshold:.2f}"] = None if i is None else {
            "seconds": steps[i]["seconds"], "samples": cumulative[i], "step": steps[i]["step"]}
        if threshold == 0.90 and i is not None:
            summary["at_0_90"] = moment(i)
    if heldout is not None:
        summary["heldout"] = dict(heldout)
        if heldout_start is not None:
            summary["heldout"]["distinct2_ratio"] = _ratio(heldout["distinct2"], heldout_start["distinct2"])
    return summary


def guards_hold(moment: dict | None) -> bool:
    """KL, distinct-2 and repetition within the issue's bounds at that moment."""
    return (moment is not None and moment["kl"] <= MAX_KL
            and (moment["distinct2_ratio"] or 0.0) >= MIN_DISTINCT2_RATIO
            and moment["repetition_rate"] <= MAX_REPETITION)


def verdict(summaries: dict[str, dict], default_run: str, grpo_run: str = "trl-grpo",
            ppo_run: str = "trl-ppo") -> list[tuple[str, str, bool]]:
    """The issue's targets, each as (what, measured, met). Runs missing from ``summaries`` miss."""
    ours, grpo, peer_ppo = summaries.get(default_run), summaries.get(grpo_run), summaries.get(ppo_run)
    rows = []
    t_ours = ((ours or {}).get("reached") or {}).get("0.90")
    t_grpo = ((grpo or {}).get("reached") or {}).get("0.90")
    if t_ours and t_grpo:
        ratio = t_ours["seconds"] / max(t_grpo["seconds"], 1e-9)
        rows.append((f"{default_run} reaches 0.90 in <= {MAX_TIME_RATIO_TO_GRPO}x {grpo_run}'s time",
                     f"{t_ours['seconds']:.1f}s vs {t_grpo['seconds']:.1f}s = {ratio:.2f}x",
                     ratio <= MAX_TIME_RATIO_TO_GRPO))
    else:
        rows.append((f"{default_run} reaches 0.90 in <= {MAX_TIME_RATIO_TO_GRPO}x {grpo_run}'s time",
                     f"{default_run}: {_fmt_s(t_ours)}, {grpo_run}: {_fmt_s(t_grpo)}", False))
    at90 = (ours or {}).get("at_0_90")
    rows.append((f"{default_run} guards at 0.90 (KL <= {MAX_KL:g}, distinct-2 >= {MIN_DISTINCT2_RATIO}x, "
                 f"repetition <= {MAX_REPETITION:.0%})", _fmt_guards(at90), guards_hold(at90)))
    end = (ours or {}).get("end")
    rows.append((f"{default_run} guards at the end", _fmt_guards(end), guards_hold(end)))
    heldout = ((ours or {}).get("heldout") or {}).get("reward_mean")
    rows.append((f"{default_run} held-out reward >= {MIN_HELDOUT_REWARD}",
                 "-" if heldout is None else f"{heldout:.3f}",
                 heldout is not None and heldout >= MIN_HELDOUT_REWARD))
    speed_ours = (ours or {}).get("samples_per_second")
    speed_ppo = (peer_ppo or {}).get("samples_per_second")
    if speed_ours and speed_ppo:
        rows.append((f"{default_run} samples/s >= {MIN_SPEED_RATIO_TO_PPO}x {ppo_run}'s",
                     f"{speed_ours:.0f} vs {speed_ppo:.0f} = {speed_ours / speed_ppo:.2f}x",
                     speed_ours / speed_ppo >= MIN_SPEED_RATIO_TO_PPO))
    else:
        rows.append((f"{default_run} samples/s >= {MIN_SPEED_RATIO_TO_PPO}x {ppo_run}'s", "-", False))
    return rows


def _fmt_s(reached: dict | None) -> str:
    return "never" if not reached else f"{reached['seconds']:.1f}s"


def _fmt_guards(moment: dict | None) -> str:
    if moment is None:
        return "-"
    ratio = moment["distinct2_ratio"]
    return (f"KL {moment['kl']:.2f}, distinct-2 {'-' if ratio is None else f'{ratio:.2f}x'}, "
            f"repetition {moment['repetition_rate']:.1%}")


def _num(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(summaries: dict[str, dict]) -> str:
    """The comparison as a Markdown table, one row per run."""
    head = ("| run | samples/s | s to 0.80 / 0.85 / 0.90 | samples to 0.90 | at 0.90: KL, distinct-2 x, "
            "repetition | end: KL, distinct-2 x, repetition | held-out reward, distinct-2 x, repetition |")
    lines = [head, "|" + "---|" * 7]
    for name, s in summaries.items():
        reached = s["reached"]
        times = " / ".join(_num((reached.get(f"{t:.2f}") or {}).get("seconds")) for t in THRESHOLDS)
        samples90 = (reached.get("0.90") or {}).get("samples")

        def guards(m):
            if m is None:
                return "-"
            return f"{m['kl']:.2f}, {_num(m['distinct2_ratio'], '.2f')}x, {m['repetition_rate']:.1%}"

        h = s.get("heldout")
        held = "-" if not h else (f"{h['reward_mean']:.3f}, {_num(h.get('distinct2_ratio'), '.2f')}x, "
                                  f"{h['repetition_rate']:.1%}")
        lines.append(f"| {name} | {_num(s['samples_per_second'], '.0f')} | {times} | "
                     f"{'-' if samples90 is None else samples90} | {guards(s['at_0_90'])} | {guards(s['end'])} | "
                     f"{held} |")
    return "\n".join(lines)
