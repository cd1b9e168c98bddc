"""Blending the reward model with the n-gram ranker: a measurement, not a served model.

The two rankers err on different pairs, so a weighted sum of their scores, each divided by its
spread on the held-out lists, ranks better than either. The weight is chosen on the held-out
lists (never on dev); the dev lists only measure the blend. Only differences within a list
matter for ranking, so the scores are divided by their standard deviation and not centred.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from haoping.rank_loss import ranking_metrics, split_per_list
from haoping.ranklists import RankList

BLEND_WEIGHTS = tuple(i / 10 for i in range(11))  # weight of the n-gram ranker; 0 is the reward model alone


def spread(scores: Tensor) -> float:
    """Standard deviation of ``scores`` (1.0 when they are all equal). Tensor[N] → float"""
    value = float(scores.double().std()) if scores.numel() > 1 else 0.0
    return value if value > 0.0 else 1.0


def blend(model: Tensor, linear: Tensor, weight: float, model_spread: float, linear_spread: float) -> Tensor:
    """weight · linear / linear_spread + (1 − weight) · model / model_spread.
    model, linear: Tensor[N] → Tensor[N] (float64)"""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must lie in [0, 1], not {weight}")
    return weight * linear.double() / linear_spread + (1.0 - weight) * model.double() / model_spread


def choose_blend_weight(model: Tensor, linear: Tensor, lists: Sequence[RankList],
                        weights: Sequence[float] = BLEND_WEIGHTS) -> tuple[float, dict, float, float]:
    """The weight with the best pairwise accuracy on ``lists`` (whole-list accuracy, then the
    smaller weight, break ties), its metrics there, and the two spreads it was chosen with.

    model, linear: Tensor[Σ n_l], the two rankers' scores of the flattened texts of ``lists``
    → (weight, metrics, model_spread, linear_spread)
    """
    if model.shape != linear.shape or model.dim() != 1 or model.numel() != sum(len(r.texts) for r in lists):
        raise ValueError(f"need one score per text of the lists from both rankers, got {tuple(model.shape)} "
                         f"and {tuple(linear.shape)} for {sum(len(r.texts) for r in lists)} texts")
    model_spread, linear_spread = spread(model), spread(linear)
    best = None
    for weight in weights:
        metrics = blend_metrics(model, linear, lists, weight, model_spread, linear_spread)
        key = (metrics["pairwise_accuracy"], metrics["list_accuracy"], -weight)
        if best is None or key > best[0]:
            best = (key, weight, metrics)
    return best[1], best[2], model_spread, linear_spread


def blend_metrics(model: Tensor, linear: Tensor, lists: Sequence[RankList], weight: float,
                  model_spread: float, linear_spread: float) -> dict:
    """Ranking metrics of the blend with a weight and spreads chosen elsewhere."""
    return ranking_metrics(split_per_list(blend(model, linear, weight, model_spread, linear_spread), lists))
