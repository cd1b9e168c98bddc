"""Training curves as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_reward_kl(records: list[dict], path: Path, title: str = "PPO") -> Path:
    cycles = [r["cycle"] for r in records]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_reward.plot(cycles, [r["reward_mean"] for r in records], marker=".", label="mean reward")
    if records and "eval_reward_mean" in records[0]:
        ax_reward.plot(cycles, [r["eval_reward_mean"] for r in records], marker=".", label="evaluator")
    ax_reward.set_xlabel("cycle")
    ax_reward.set_ylabel("reward")
    ax_reward.set_ylim(0, 1.02 if all(0 <= r["reward_mean"] <= 1 for r in records) else None)
    ax_reward.grid(alpha=0.3)
    ax_reward.legend(loc="lower right")
    ax_kl.plot(cycles, [r["kl"] for r in records], marker=".", color="tab:red", label="KL (nats/seq)")
    ax_kl.set_xlabel("cycle")
    ax_kl.set_ylabel("KL to reference, nats per sequence")
    ax_kl.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
