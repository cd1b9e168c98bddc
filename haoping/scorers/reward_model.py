"""The reward-model backend: a trained scalar-head model (see :mod:`haoping.reward_model`) serving scores."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch

from haoping import models
from haoping.reward_model.model import REWARD_LABEL, forward_scores, text_max_length
from haoping.scorers.base import ModelScorer, ScoreResult, truncated_flags

NORMALIZE_KINDS = ("none", "sigmoid", "running")


class RewardModelScorer(ModelScorer):
    """Serves a trained reward model: texts in, :class:`ScoreResult` out.

    normalize: ``none`` (score = raw scalar), ``sigmoid`` (σ(raw), in (0, 1)) or ``running``
    ((raw − mean) / std, with mean and std over every text scored so far, this batch included).
    """

    backend = "reward-model"

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 normalize: str = "none"):
        if normalize not in NORMALIZE_KINDS:
            raise ValueError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZE_KINDS)}")
        self.model_id = str(path)
        self.normalize = normalize
        self.device = torch.device(device)
        self.tokenizer = models.load_tokenizer(self.model_id)
        self.model = models.load_sequence_classifier(self.model_id, self.device, dtype)
        if self.model.config.num_labels != 1:
            raise models.ModelLoadError(
                f"{self.model_id} has {self.model.config.num_labels} labels; a reward model has a scalar head "
                "(train one with `haoping train-reward-model`)")
        self.max_length = text_max_length(self.model, self.tokenizer)
        self._stats_lock = threading.Lock()  # gRPC may score batches on several threads
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @torch.inference_mode()
    def raw_scores(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return forward_scores(self.model, self.tokenizer, texts, self.max_length, self.device).cpu().tolist()

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        raw = self.raw_scores(list(texts))
        if self.normalize == "none":
            scores = raw
        elif self.normalize == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-r)) if r >= 0 else math.exp(r) / (1.0 + math.exp(r)) for r in raw]
        else:
            scores = self._update_and_standardize(raw)
        truncated = truncated_flags(self.tokenizer, list(texts), self.max_length)
        return [ScoreResult(score=float(s), label=REWARD_LABEL, raw_score=float(r), truncated=cut)
                for s, r, cut in zip(scores, raw, truncated)]

    def _update_and_standardize(self, raw: list[float]) -> list[float]:
        if not raw:
            return []
        batch_mean = sum(raw) / len(raw)
        batch_m2 = sum((r - batch_mean) ** 2 for r in raw)
        with self._stats_lock:
            # Chan et al.'s merge of two (count, mean, M2) summaries: exact, one pass per batch
            total = self._count + len(raw)
            delta = batch_mean - self._mean
            self._mean += delta * len(raw) / total
            self._m2 += batch_m2 + delta * delta * self._count * len(raw) / total
            self._count = total
            mean, std = self._mean, math.sqrt(self._m2 / total)
        return [(r - mean) / (std + 1e-6) for r in raw]

    @property
    def running_stats(self) -> dict[str, float]:
        with self._stats_lock:
            return {"count": self._count, "mean": self._mean,
                    "std": math.sqrt(self._m2 / self._count) if self._count else 0.0}
