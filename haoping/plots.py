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


def _moving_mean(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_reward_model_curves(history: dict, out_dir: Path) -> tuple[Path, Path]:
    """loss.png and accuracy.png of a reward-model training run (its metrics.json history)."""
    fig, axes = plt.subplots(figsize=(7, 4))
    axes.plot(history["train_step"], history["train_loss"], alpha=0.25, color="tab:blue", label="train (per step)")
    axes.plot(history["train_step"], _moving_mean(history["train_loss"]), color="tab:blue",
              label="train (20-step mean)")
    axes.plot(history["eval_step"], history["dev_loss"], "o-", color="tab:orange", label="dev")
    axes.set(xlabel="step", ylabel="loss", title="Reward model loss")
    axes.legend()
    fig.tight_layout()
    loss_path = Path(out_dir) / "loss.png"
    fig.savefig(loss_path, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(figsize=(7, 4))
    axes.plot(history["train_step"], history["train_pairwise_accuracy"], alpha=0.5, color="tab:blue",
              label="train pairwise (since last eval)")
    axes.plot(history["eval_step"], history["dev_pairwise_accuracy"], "o-", color="tab:orange", label="dev pairwise")
    axes.plot(history["eval_step"], history["dev_list_accuracy"], "s-", color="tab:green", label="dev whole-list")
    if history.get("select_pairwise_accuracy"):
        axes.plot(history["eval_step"], history["select_pairwise_accuracy"], "o--", color="tab:red",
                  label="held-out pairwise (chooses the checkpoint)")
    axes.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Reward model accuracy")
    axes.legend(loc="lower right")
    fig.tight_layout()
    accuracy_path = Path(out_dir) / "accuracy.png"
    fig.savefig(accuracy_path, dpi=100)
    plt.close(fig)
    return loss_path, accuracy_path
