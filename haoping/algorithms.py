"""Critic-free policy-gradient math (GRPO, RLOO) and the one reward-shaping function, as pure
functions on tensors (no models, no I/O, no gRPC).

Shapes: B = rollouts in the batch, T = response tokens (right-padded), ``mask`` [B, T] is 1 on
real response tokens. ``groups`` [B] says which rollouts answer the same prompt: a rollout's
advantage is its score compared with the other samples of its prompt, so no value head is
needed (Shao et al. 2024, GRPO; Ahmadian et al. 2024, RLOO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from haoping import ppo


def group_ids(keys: list) -> torch.Tensor:
    """Hashable keys [B] (e.g. each rollout's query ids as a tuple) -> dense group ids [B]."""
    index: dict = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def _group_sums(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B], groups [B] -> (sum of x over each row's group [B], size of each row's group [B])."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, x)
    counts = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, torch.ones_like(x))
    return sums[groups], counts[groups]


def grpo_advantages(scores: torch.Tensor, groups: torch.Tensor, scale: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (score - mean of its group) / (std of its group + eps), std unbiased as in TRL.

    scores [B], groups [B] -> advantages [B]. A group of one gets 0 (nothing to compare with).
    ``scale=False`` keeps only the centering (Dr. GRPO): once all samples of a prompt score alike,
    dividing by their tiny std would blow noise up into full-size advantages.
    """
    sums, counts = _group_sums(scores, groups)
    mean = sums / counts
    centered = scores - mean
    if not scale:
        return torch.where(counts > 1, centered, torch.zeros_like(centered))
    sq, _ = _group_sums(centered ** 2, groups)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    return torch.where(counts > 1, centered / (std + eps), torch.zeros_like(centered))


def rloo_advantages(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO: score minus the mean of the *other* samples of its prompt.

    scores [B], groups [B] -> advantages [B]; r_i - (S - r_i)/(k - 1) = k/(k-1) (r_i - mean).
    A group of one gets 0.
    """
    sums, counts = _group_sums(scores, groups)
    others = (sums - scores) / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, scores - others, torch.zeros_like(scores))


@dataclass
class CriticFreeLossOut:
    loss: torch.Tensor      # scalar: policy loss + beta * KL
    policy: torch.Tensor    # scalar: the clipped surrogate alone
    kl: torch.Tensor        # scalar: mean k3 KL to the reference per real token
    clipfrac: torch.Tensor  # scalar
    approxkl: torch.Tensor  # scalar: 0.5 * mean (log p - log p_old)^2


def critic_free_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, clip: float, beta: float) -> CriticFreeLossOut:
    """GRPO's per-token objective, averaged over the real tokens of the batch (TRL's "dapo"/token-level
    aggregation): max(-A r, -A clip(r, 1-e, 1+e)) + beta * k3(p || ref), r = p / p_old.

    logp, old_logp, ref_logp, mask [B, T]; advantages [B] (one per sequence, spread over its tokens).
    """
    per_token_adv = advantages.unsqueeze(1).expand_as(logp)
    pg = ppo.policy_loss(logp, old_logp, per_token_adv, mask, clip)
    kl = ppo.masked_mean(ppo.kl_estimate(logp, ref_logp, "k3"), mask)
    return CriticFreeLossOut(pg.loss + beta * kl, pg.loss, kl, pg.clipfrac, pg.approxkl)


# ---------------------------------------------------------------- reward shaping

def sigmoid_scores(scores: torch.Tensor) -> torch.Tensor:
    """A reward model's raw scalar [B] -> P(preferred) in (0, 1) [B]."""
    return torch.sigmoid(scores)


def shape_rewards(scores: torch.Tensor, empty: torch.Tensor, groups: list, *,
                  empty_response_reward: float | None, normalization: str,
                  moments: "ppo.RunningMoments | None", clip: float | None, baseline: str) -> torch.Tensor:
    """Every step from a scorer's raw score to the score the update uses, in this order:

    1. an empty response (``empty`` [B] True: no visible text) earns ``empty_response_reward``
       (None: its score) -- the prompt alone already scores high, so saying nothing would pay;
    2. ``normalization``: ``none``; ``sigmoid`` (a reward model's raw scalar -> (0, 1));
       ``running`` ((x - running mean) / running std, ``moments`` updated with this batch);
    3. clip to [-clip, clip] (None: no clip);
    4. ``baseline``: ``none`` or ``prompt_mean`` (subtract the mean of each prompt's group).

    scores [B] float, empty [B] bool, groups [B] hashable prompt keys -> shaped scores [B].
    """
    shaped = scores.clone()
    if empty_response_reward is not None:
        shaped = torch.where(empty, torch.full_like(shaped, empty_response_reward), shaped)
    if normalization == "sigmoid":
        shaped = sigmoid_scores(shaped)
    elif normalization == "running":
        if moments is None:
            raise ValueError("running normalization needs running moments")
    elif normalization != "none":
        raise ValueError(f"unknown reward normalization {normalization!r}")
    shaped = ppo.normalize_scores(shaped, moments if normalization == "running" else None, clip)
    if baseline == "prompt_mean":
        shaped = ppo.center_by_group(shaped, groups)
    elif baseline != "none":
        raise ValueError(f"unknown score baseline {baseline!r}")
    return shaped
