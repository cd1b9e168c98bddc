"""Rank-list losses and metrics for reward models. Pure tensor math: no models, no I/O.

Every function takes the scores of one rank list in its given order, **best first**:
``scores[0]`` is the reward of the best text, ``scores[-1]`` of the worst. A pair (i, j)
with i < j is "ordered" when i is ranked above j; a list of n texts has n·(n−1)/2 of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

LOSS_KINDS = ("logsigmoid", "sigmoid")


def ordered_pair_differences(scores: Tensor) -> Tensor:
    """r_i − r_j for every ordered pair i < j, as a flat vector.

    scores: Tensor[n] → Tensor[n·(n−1)/2]
    """
    if scores.dim() != 1:
        raise ValueError(f"expected the scores of one list, a 1-d tensor; got shape {tuple(scores.shape)}")
    if scores.numel() < 2:
        raise ValueError("a rank list needs at least 2 scores")
    upper_i, upper_j = torch.triu_indices(scores.numel(), scores.numel(), offset=1, device=scores.device)
    return scores[upper_i] - scores[upper_j]


def pairwise_rank_loss(scores: Tensor, kind: str = "logsigmoid") -> Tensor:
    """Loss of one rank list, averaged over its ordered pairs.

    ``logsigmoid`` (InstructGPT): −mean log σ(r_i − r_j). Unbounded, keeps pushing pairs apart.
    ``sigmoid`` (the reference design): −mean σ(r_i − r_j). Bounded in (−1, 0); its gradient
    vanishes for badly wrong pairs as well as for well-separated ones.

    scores: Tensor[n], best first → Tensor[] (scalar)
    """
    differences = ordered_pair_differences(scores)  # [n·(n−1)/2]
    if kind == "logsigmoid":
        return -F.logsigmoid(differences).mean()  # logsigmoid is the numerically stable log σ
    if kind == "sigmoid":
        return -torch.sigmoid(differences).mean()
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


def batch_rank_loss(score_lists: Sequence[Tensor], kind: str = "logsigmoid") -> Tensor:
    """Mean over lists of each list's pair-averaged loss.

    Each list weighs the same whatever its length (as in InstructGPT, where a list of K
    comparisons is one batch element), so long lists do not dominate a batch.

    score_lists: B × Tensor[n_b] → Tensor[]
    """
    if not score_lists:
        raise ValueError("empty batch")
    return torch.stack([pairwise_rank_loss(scores, kind) for scores in score_lists]).mean()


def pairwise_correct(scores: Tensor) -> tuple[int, int]:
    """(ordered pairs scored strictly in order, all ordered pairs). A tie counts as wrong.

    scores: Tensor[n] → (int, int)
    """
    differences = ordered_pair_differences(scores)
    return int((differences > 0).sum()), differences.numel()


def pairwise_accuracy(scores: Tensor) -> float:
    """Fraction of ordered pairs of one list scored in order. scores: Tensor[n] → float"""
    correct, total = pairwise_correct(scores)
    return correct / total


def list_accuracy(scores: Tensor) -> float:
    """1.0 when every pair of the list is in order (scores strictly decreasing), else 0.0.

    scores: Tensor[n] → float
    """
    correct, total = pairwise_correct(scores)
    return float(correct == total)


def split_per_list(scores: Tensor, lists: Sequence) -> list[Tensor]:
    """Undo the flattening of rank lists' texts: Tensor[Σ n_l] → L × Tensor[n_l]."""
    return list(torch.split(scores, [len(r.texts) for r in lists]))


def ranking_metrics(score_lists: Sequence[Tensor]) -> dict[str, float | int]:
    """Metrics over a dev set.

    pairwise_accuracy pools all ordered pairs (micro average), so a 5-text list counts for
    10 pairs; list_accuracy is the fraction of lists with every pair in order.

    score_lists: L × Tensor[n_l] → {"pairwise_accuracy", "list_accuracy", "n_lists", "n_pairs"}
    """
    if not score_lists:
        raise ValueError("no rank lists to evaluate")
    correct_pairs = total_pairs = whole_lists = 0
    for scores in score_lists:
        correct, total = pairwise_correct(scores)
        correct_pairs += correct
        total_pairs += total
        whole_lists += correct == total
    return {
        "pairwise_accuracy": correct_pairs / total_pairs,
        "list_accuracy": whole_lists / len(score_lists),
        "n_lists": len(score_lists),
        "n_pairs": total_pairs,
    }
