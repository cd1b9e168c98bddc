"""A linear char n-gram ranker: the floor a neural reward model must clear, and a teacher.

TF-IDF over character 1–3 grams, and a logistic regression over the differences of every
ordered pair of a rank list, both ways round (x_i − x_j → 1, x_j − x_i → 0, no intercept), so
the weights score one text: r(x) = w·x. scikit-learn is an optional dependency
(``pip install -e '.[linear]'``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from haoping.ranklists import RankList


class MissingDependency(ImportError):
    """scikit-learn is not installed."""


def _sklearn():
    try:
        from scipy import sparse
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise MissingDependency("the char n-gram ranker needs scikit-learn: pip install -e '.[linear]'") from err
    return sparse, TfidfVectorizer, LogisticRegression


@dataclass(frozen=True)
class NgramRankerConfig:
    ngram_min: int = 1
    ngram_max: int = 3
    c: float = 3.0  # inverse L2 strength; 3 was best of 0.3–30 on a held-out slice of the JD lists
    max_iter: int = 2000


def ordered_pairs(lists: Sequence[RankList]) -> tuple[np.ndarray, np.ndarray]:
    """(better, worse) indices into the flattened texts of ``lists``, one per ordered pair.
    → 2 × int64[Σ n_l·(n_l−1)/2]"""
    better, worse, offset = [], [], 0
    for ranklist in lists:
        n = len(ranklist.texts)
        upper_i, upper_j = np.triu_indices(n, k=1)
        better.append(upper_i + offset)
        worse.append(upper_j + offset)
        offset += n
    return np.concatenate(better), np.concatenate(worse)


class NgramRanker:
    """Fit on rank lists, then ``score(texts)`` → float64[len(texts)], higher is better."""

    def __init__(self, config: NgramRankerConfig = NgramRankerConfig()):
        self.config = config
        self.vectorizer = None
        self.weights: np.ndarray | None = None

    def fit(self, lists: Sequence[RankList]) -> "NgramRanker":
        if not lists:
            raise ValueError("no rank lists to fit the n-gram ranker on")
        sparse, TfidfVectorizer, LogisticRegression = _sklearn()
        texts = [text for ranklist in lists for text in ranklist.texts]
        self.vectorizer = TfidfVectorizer(analyzer="char", sublinear_tf=True,
                                          ngram_range=(self.config.ngram_min, self.config.ngram_max))
        features = self.vectorizer.fit_transform(texts)
        better, worse = ordered_pairs(lists)
        differences = features[better] - features[worse]
        inputs = sparse.vstack([differences, -differences]).tocsr()
        labels = np.concatenate([np.ones(len(better)), np.zeros(len(better))])
        model = LogisticRegression(C=self.config.c, fit_intercept=False, max_iter=self.config.max_iter)
        model.fit(inputs, labels)
        self.weights = model.coef_[0]
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError("fit the n-gram ranker before scoring")
        return np.asarray(self.vectorizer.transform(list(texts)) @ self.weights, dtype=np.float64)
