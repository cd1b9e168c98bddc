"""Classifier backends: any HF sequence classifier, and snownlp's naive Bayes as a judge."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from haoping.models import load_sequence_classifier, load_tokenizer, positive_label_index
from haoping.scorers.base import ModelScorer, ScoreResult, truncated_flags


class ClassifierScorer(ModelScorer):
    """Any HF sequence classifier; the reward is the positive label's probability.

    The positive label is read from ``config.id2label``, so hub models such as
    ``uer/roberta-base-finetuned-jd-binary-chinese`` work as well as the starter one.
    """

    backend = "classifier"

    def __init__(self, model_ref: str, device="cpu", dtype=torch.float32, max_length: int = 128,
                 batch_size: int = 64):
        self.model_id = model_ref
        self.tokenizer = load_tokenizer(model_ref)
        self.model = load_sequence_classifier(model_ref, device, dtype)
        self.device = torch.device(device)
        self.positive_index = positive_label_index(self.model.config.id2label)
        self.max_length = min(max_length, int(getattr(self.model.config, "max_position_embeddings", max_length)))
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        texts = list(texts)
        results: list[ScoreResult] = []
        id2label = self.model.config.id2label
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            probs = torch.softmax(logits, -1)
            truncated = truncated_flags(self.tokenizer, chunk, self.max_length)
            for row_logits, row_probs, cut in zip(logits, probs, truncated):
                label = id2label[int(row_probs.argmax())]
                results.append(ScoreResult(float(row_probs[self.positive_index]), str(label),
                                           float(row_logits[self.positive_index]), cut))
        return results


class SnowNLPScorer(ModelScorer):
    """snownlp's own naive-Bayes sentiment model: another model family, no neural network.

    Used as an independent judge of trained policies, so a gain is not only in the eyes of
    the classifier PPO optimized against.
    """

    backend = "snownlp"
    model_id = "snownlp-bayes"
    max_length = 0

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        from snownlp import SnowNLP

        results = []
        for text in texts:
            p = float(SnowNLP(text).sentiments) if text.strip() else 0.5
            results.append(ScoreResult(p, "positive" if p >= 0.5 else "negative", p))
        return results
