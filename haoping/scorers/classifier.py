"""Classifier backends: any HF sequence classifier, and snownlp's naive Bayes as a judge."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from haoping.models import load_sequence_classifier, load_tokenizer, positive_label_index
from haoping.scorers.base import ModelScorer, ScoreResult, length_sorted_batches, truncated_flags


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
        results: list[ScoreResult | None] = [None] * len(texts)
        label_names = [str(self.model.config.id2label[i]) for i in range(self.model.config.num_labels)]
        # tokenized once, then padded per batch: a third of the tokenizer's time of a call per batch
        token_ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        for batch in length_sorted_batches([len(ids) for ids in token_ids], self.batch_size):
            chunk = [texts[i] for i in batch]
            enc = self.tokenizer.pad({"input_ids": [token_ids[i] for i in batch]}, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            probs = torch.softmax(logits, -1)
            # one host copy per batch, not a tensor op per row
            positive = probs[:, self.positive_index].tolist()
            positive_logit = logits[:, self.positive_index].tolist()
            labels = probs.argmax(-1).tolist()
            truncated = truncated_flags(self.tokenizer, chunk, self.max_length)
            for row, i in enumerate(batch):
                results[i] = ScoreResult(positive[row], label_names[labels[row]], positive_logit[row],
                                         truncated[row])
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
