"""Every option of the update step, as one dataclass; each field is a typed flag of `haoping run`
and `haoping serve trainer`. Free of torch, so the coordinator and the CLI import it cheaply."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def option(default, help: str, choices: tuple | None = None):
    """A PPOConfig field with its help (and allowed values): the flags are generated from these."""
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class PPOConfig:
    """Every option of the update step; each is a typed flag of `haoping run` and `haoping serve trainer`."""

    algorithm: str = option("ppo", "ppo: value head and GAE; grpo: group-normalized advantages, k3 KL in the loss; "
                            "rloo: leave-one-out baseline, k3 KL in the loss (critic-free: no value head)", ALGORITHMS)
    learning_rate: float = option(1e-3, "AdamW learning rate of the policy")
    value_learning_rate: float | None = option(None, "learning rate of the value head (none: learning_rate)")
    value_warmup_steps: int = option(0, "first N steps train only the value head")
    lr_schedule: str = option("constant", "learning-rate schedule over total_steps (transformers.get_scheduler)",
                              ("constant", "linear", "cosine"))
    lr_warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    total_steps: int = option(1000, "steps the linear and cosine schedules span")
    ppo_epochs: int = option(4, "passes over each batch of rollouts")
    # 64 rollouts a cycle: one minibatch, 4 epochs; fewer, less noisy Adam steps
    minibatch_size: int = option(64, "rollouts per optimizer step")
    gradient_accumulation_steps: int = option(1, "micro-batches per minibatch (same result, less memory)")
    forward_batch_size: int = option(64, "rows per chunk of the no-grad forward passes")
    gamma: float = option(1.0, "discount (ppo)")
    lam: float = option(0.95, "GAE lambda (ppo)")
    cliprange: float = option(0.2, "policy ratio clip epsilon")
    cliprange_value: float = option(0.2, "value clip epsilon (ppo)")
    vf_coef: float = option(0.1, "value loss coefficient (ppo)")
    max_grad_norm: float = option(1.0, "gradient norm clip")
    adaptive_kl: bool = option(True, "move the KL coefficient so that KL tracks kl_target (Ziegler et al.)")
    init_kl_coef: float = option(0.2, "KL coefficient at the start: in the reward (ppo), beta in the loss or the "
                                 "reward (grpo, rloo: kl_penalty)")
    kl_target: float = option(6.0, "KL target of the adaptive controller, nats per sequence")
    kl_horizon: int = option(10000, "adaptive KL horizon in rollouts: smaller reacts faster")
    kl_estimator: str = option("k1", "per-token KL estimator in the reward (ppo)", ("k1", "k3"))
    kl_penalty: str = option("loss", "grpo, rloo: where the KL coefficient applies: beta * k3 per token in the loss, "
                             "or kl_coef * the rollout's KL (kl_estimator, summed) subtracted from its score before "
                             "the group advantages", ("loss", "reward"))
    kl_loss_coef: float = option(0.0, "ppo: > 0 adds a k3 KL-to-reference term in the loss, per token")
    empty_response_reward: float | None = option(
        0.0, "reward of a response with no visible text (none: its score): the prompt alone already scores high")
    reward_normalization: str = option("none", "score normalization: running mean/std, or sigmoid of a "
                                       "reward model's raw scalar", ("none", "running", "sigmoid"))
    reward_clip: float | None = option(None, "clip normalized scores to [-x, x] (none: no clip)")
    score_baseline: str = option("none", "prompt_mean: subtract the mean score of the same prompt's rollouts (ppo)",
                                 ("none", "prompt_mean"))
    whiten_advantages: bool = option(True, "whiten GAE advantages over the batch (ppo)")
    scale_advantages: bool = option(True, "grpo: divide each prompt's centered scores by their std (no: "
                                    "Dr. GRPO, centering only)")
    min_response_tokens: int = option(0, "EOS was masked before this many tokens at sampling; mask it here too "
                                      "(a Step may carry its own)")
    target_reward: float | None = option(
        None, "once the mean raw score of the last 3 batches reaches this, the policy learns at "
        "target_reward_lr_factor x its rate (until it falls below again): keep a reached reward, do not chase more")
    target_reward_lr_factor: float = option(0.1, "learning-rate factor while target_reward is reached (0: hold)")
    stale_rollouts: str = option("count", "rollouts whose policy_version differs from the trainer's: count them "
                                 "in the statistics, or reject the Step", ("count", "reject"))
    # Freeze the token embeddings and the LM head (tied in GPT-2). Every vocabulary row gets a
    # gradient through the softmax, and Adam moves even a rare token's row by ~lr per step: a
    # coherent drift of all rare tokens' logits that costs KL and diversity, not reward.
    freeze_embeddings: bool = option(True, "freeze the token embeddings and the (tied) LM head")
    seed: int = option(0, "torch seed of the trainer")

    def __post_init__(self):
        if isinstance(self.reward_normalization, bool):  # the JSON form before it had a sigmoid option
            self.reward_normalization = "running" if self.reward_normalization else "none"
        problems = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} must be {' or '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("ppo_epochs", "minibatch_size", "gradient_accumulation_steps", "forward_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.minibatch_size % self.gradient_accumulation_steps:
            problems.append("minibatch_size must be a multiple of gradient_accumulation_steps")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def uses_value_head(self) -> bool:
        return self.algorithm == "ppo"

    @classmethod
    def from_dict(cls, values: dict) -> "PPOConfig":
        """Options by name; an algorithm's preset (ALGORITHM_PRESETS) fills what ``values`` leaves out."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown PPO options: {', '.join(sorted(unknown))}")
        preset = ALGORITHM_PRESETS.get(values.get("algorithm", "ppo"), {})
        return cls(**{**preset, **values})


# Defaults per algorithm where the dataclass default (PPO's) does not suit it; an explicit option wins.
ALGORITHM_PRESETS: dict[str, dict] = {
    "ppo": {},
    # one pass over each batch (one Adam step of the whole batch, as TRL's GRPO takes), a larger
    # learning rate than PPO's, and a fixed KL penalty in the reward: the rollout's KL, not only
    # its score, ranks it within its prompt (docs/algorithms.md)
    "grpo": {"ppo_epochs": 1, "learning_rate": 1.5e-3, "kl_penalty": "reward", "init_kl_coef": 0.03,
             "adaptive_kl": False},
    "rloo": {"ppo_epochs": 1, "learning_rate": 1.5e-3, "kl_penalty": "reward", "init_kl_coef": 0.03,
             "adaptive_kl": False},
}
