"""The reward-model backend: a trained scalar-head model (see :mod:`haoping.reward_model`) serving scores."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from haoping import models
from haoping.reward_model.model import REWARD_LABEL, forward_scores, text_max_length
from haoping.scorers.base import ModelScorer, ScoreResult, truncated_flags


class RewardModelScorer(ModelScorer):
    """Serves a trained reward model: texts in, :class:`ScoreResult` out, score = the raw scalar.
    Shaping it into a reward (sigmoid, running mean/std, clipping) is the trainer's
    (``PPOConfig.reward_normalization``)."""

    backend = "reward-model"
    scores_in_unit_interval = False  # an unbounded scalar

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model_id = str(path)
        self.device = torch.device(device)
        self.tokenizer = models.load_tokenizer(self.model_id)
        self.model = models.load_sequence_classifier(self.model_id, self.device, dtype)
        if self.model.config.num_labels != 1:
            raise models.ModelLoadError(
                f"{self.model_id} has {self.model.config.num_labels} labels; a reward model has a scalar head "
                "(train one with `haoping train-reward-model`)")
        self.max_length = text_max_length(self.model, self.tokenizer)

    @torch.inference_mode()
    def raw_scores(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return forward_scores(self.model, self.tokenizer, texts, self.max_length, self.device).cpu().tolist()

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        raw = self.raw_scores(list(texts))
        truncated = truncated_flags(self.tokenizer, list(texts), self.max_length)
        return [ScoreResult(score=float(r), label=REWARD_LABEL, raw_score=float(r), truncated=cut)
                for r, cut in zip(raw, truncated)]
