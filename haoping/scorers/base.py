"""The one scorer interface. The scorer service talks to every backend through it alone."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class ScoreResult:
    score: float      # the backend's score: positive probability, reward-model scalar, or stars mapped to [0, 1]
    label: str        # classifier: the argmax label; reward model: "reward"; human: "human"
    raw_score: float  # classifier: positive-class logit; reward model: the scalar; human: the stars
    truncated: bool = False  # only the first max_length tokens of the text were read


WARM_UP_TEXTS = ("质量很好",)  # what a model scorer scores once before it serves


def truncated_flags(tokenizer, texts: Sequence[str], max_length: int) -> list[bool]:
    """Which texts have more than ``max_length`` tokens (special tokens included). Every token
    covers at least one byte, so only texts of more than ``max_length - 2`` UTF-8 bytes are
    tokenized to find out."""
    flags = [False] * len(texts)
    long = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + 2 > max_length]
    if long:
        ids = tokenizer([texts[i] for i in long], truncation=False)["input_ids"]
        for i, row in zip(long, ids):
            flags[i] = len(row) > max_length
    return flags


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of texts (of ``lengths`` tokens) grouped into batches of at most ``batch_size``,
    shortest first: each batch is padded to its own longest text, so similar lengths together pad
    least (a quarter fewer positions, and ~25% less forward time, on rollouts of 12-31 characters)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def in_unit_interval(results: Sequence[ScoreResult], scores_in_unit_interval: bool) -> list[ScoreResult]:
    """Scores in (0, 1) for a caller that asks for them: an unbounded backend's scores through a
    sigmoid (raw_score unchanged), a backend whose scores are already in [0, 1] as is."""
    if scores_in_unit_interval:
        return list(results)
    return [replace(r, score=_sigmoid(r.score)) for r in results]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow


class ScoreTimeout(TimeoutError):
    """The deadline passed before every text had a score."""


class ScoreCancelled(Exception):
    """The caller went away (``is_cancelled()`` turned true) before every text had a score."""


class ScorerBusy(Exception):
    """The backend's queue is full; the caller may retry later."""


@runtime_checkable
class Scorer(Protocol):
    backend: str          # "classifier", "reward-model", "human", ...
    model_id: str
    max_length: int       # longest input in tokens the backend reads (0: no token limit)
    batchable: bool       # True: concurrent requests may be merged into one score() call
    scores_in_unit_interval: bool  # True: every score is in [0, 1] (a probability, a rating)

    def start(self) -> None:
        """Acquire what serving needs beyond loading (e.g. a web page); idempotent."""

    def stop(self) -> None:
        """Release what start() acquired; idempotent."""

    def warm_up(self) -> None:
        """One real request through the backend (or its page); the service is SERVING after it."""

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        """One result per text, in order. Raises ScoreTimeout after ``timeout`` seconds (None: no
        limit), ScoreCancelled once ``is_cancelled()`` is true and ScorerBusy when it cannot take
        more work now; a fast backend may ignore the timeout and the cancellation."""


class ModelScorer:
    """Defaults for a backend that is a model in this process: batchable, nothing to start or
    stop, warmed up by scoring one text. Subclasses set backend, model_id, max_length, score()."""

    batchable = True
    scores_in_unit_interval = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def warm_up(self) -> None:
        self.score(WARM_UP_TEXTS)
