"""The one place a scorer backend is chosen by name."""
from __future__ import annotations

import torch

from haoping.scorers.base import Scorer

BACKENDS = ("classifier", "reward-model", "snownlp", "human")


def build_scorer(backend: str, model_ref: str, device="cpu", dtype=torch.float32,
                 human_host: str = "127.0.0.1", human_port: int = 8090, max_pending: int = 256) -> Scorer:
    """``classifier``, ``reward-model``, ``snownlp`` or ``human`` (a person rates the texts on a web
    page at ``human_host:human_port``; ``model_ref`` is not used). Loads the model; start() is the caller's."""
    if backend == "human":
        from haoping.scorers.human import HumanScorer

        return HumanScorer(max_pending=max_pending, host=human_host, port=human_port)
    if backend == "snownlp":
        from haoping.scorers.classifier import SnowNLPScorer

        return SnowNLPScorer()
    if backend == "classifier":
        from haoping.scorers.classifier import ClassifierScorer

        return ClassifierScorer(model_ref, device, dtype)
    if backend == "reward-model":
        from haoping.scorers.reward_model import RewardModelScorer

        return RewardModelScorer(model_ref, device=device, dtype=dtype)
    raise ValueError(f"unknown scorer backend {backend!r}; use {', '.join(BACKENDS)}")
