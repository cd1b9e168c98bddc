"""PPO math for RLHF, as pure functions on tensors (no models, no I/O, no gRPC).

Shapes: B = rollouts in the batch, T = response tokens (right-padded).
``mask`` [B, T] is 1 on real response tokens (an EOS token the policy chose is real),
0 on padding; every statistic and loss below ignores padding.
Follows the InstructGPT/TRL recipe: per-token KL penalty in the reward, the score on the
last real token, GAE, whitened advantages, clipped policy and value losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- masked statistics

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------- log-probs, KL, entropy

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], tokens [B, T] -> log p(token) [B, T]."""
    return token_logprobs(F.log_softmax(logits.float(), dim=-1), tokens)


def token_logprobs(logp_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax [B, T, V], tokens [B, T] -> log p(token) [B, T]."""
    return torch.gather(logp_all, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] -> entropy [B, T] in nats. A masked-out token (logit -inf) adds 0, not NaN."""
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp_all: torch.Tensor) -> torch.Tensor:
    """log-softmax [B, T, V] -> entropy [B, T]; lets a caller reuse one log-softmax for both."""
    return -(logp_all.exp() * logp_all.clamp(min=torch.finfo(logp_all.dtype).min)).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from log-probs of the sampled tokens [B, T].

    k1 = log p - log q: unbiased, can be negative per token.
    k3 = (r - 1) - log r with r = q/p: unbiased, always >= 0, lower variance (Schulman 2020).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] -> index of the last real token per row [B] (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def compute_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every real token, plus the score on the last one.

    scores [B], logp/ref_logp/mask [B, T] -> (rewards [B, T], kl [B, T], non_score_reward [B, T]).
    """
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl, non_score * mask


# ---------------------------------------------------------------- advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded responses.

    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]).
    The value after the last real token is 0 (the episode ends there).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]  # padding carries nothing back
        advantages[:, t] = last
    returns = advantages + values
    return advantages * mask, returns * mask


# ---------------------------------------------------------------- losses

@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> PolicyLossOut:
    """Clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = p/p_old."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return PolicyLossOut(loss, clipfrac, approxkl)


@dataclass
class ValueLossOut:
    loss: torch.Tensor
    clipfrac: torch.Tensor


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> ValueLossOut:
    """0.5 * mean over real tokens of max((v - R)^2, (clip(v, v_old +- e) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return ValueLossOut(loss, clipfrac)


# ---------------------------------------------------------------- KL controllers

class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient so that KL tracks `target`.

    error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def target_reward_factor(recent_rewards: list[float], target: float | None, factor: float) -> float:
    """Learning-rate factor: ``factor`` while the mean of the recent batches' rewards is at least
    ``target``, else 1 (None: no target). Past the target, the reward model's optimum lies in
    what it over-rates (reward hacking); what is left to gain costs KL and diversity."""
    if target is None or not recent_rewards:
        return 1.0
    return factor if sum(recent_rewards) / len(recent_rewards) >= target else 1.0


# ---------------------------------------------------------------- reward normalization

class RunningMoments:
    """Running mean/std of scores across batches (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = x.numel()
        batch_mean = x.mean().item()
        batch_var = x.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def center_by_group(scores: torch.Tensor, groups: list) -> torch.Tensor:
    """scores [B] minus the mean score of their group (rollouts of the same prompt): a
    per-prompt baseline, as in GRPO/RLOO, so an easy prompt's high score is not mistaken
    for a good response. A group of one gets 0: it has nothing to be compared with."""
    centered = scores.clone()
    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    for index in members.values():
        rows = torch.tensor(index, device=scores.device)
        centered[rows] = scores[rows] - scores[rows].mean()
    return centered


def normalize_scores(scores: torch.Tensor, moments: RunningMoments | None, clip: float | None) -> torch.Tensor:
    """(score - running mean) / running std, then clipped to [-clip, clip]; either step optional."""
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores
