"""A linear n-gram ranker: the floor a neural reward model must clear, a teacher, and the
other half of the measured ensemble.

Features: TF-IDF over character 1–3 grams, plus (``word_ngram_max`` > 0) TF-IDF over word 1–2
grams, the words cut by jieba's dictionary (``HMM=False``: only the dictionary, never its trained
HMM for unknown words). A logistic regression over the differences of every ordered pair of a
rank list, both ways round (x_i − x_j → 1, x_j − x_i → 0, no intercept), so the weights score one
text: r(x) = w·x. scikit-learn and jieba are optional dependencies (``pip install -e '.[linear]'``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from haoping.ranklists import RankList


class MissingDependency(ImportError):
    """scikit-learn (or, for word n-grams, jieba) is not installed."""


def _sklearn():
    try:
        from scipy import sparse
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion
    except ImportError as err:
        raise MissingDependency("the n-gram ranker needs scikit-learn: pip install -e '.[linear]'") from err
    return sparse, TfidfVectorizer, LogisticRegression, FeatureUnion


def jieba_words(text: str) -> list[str]:
    """Words of ``text`` by jieba's dictionary alone (no HMM), whitespace dropped."""
    try:
        import jieba
    except ImportError as err:
        raise MissingDependency("word n-grams need jieba: pip install -e '.[linear]' "
                                "(or word_ngram_max=0 for char n-grams alone)") from err
    jieba.setLogLevel(logging.WARNING)  # it logs the dictionary load at INFO
    return [word for word in jieba.lcut(text, HMM=False) if word.strip()]


@dataclass(frozen=True)
class NgramRankerConfig:
    ngram_min: int = 1
    ngram_max: int = 3
    word_ngram_max: int = 0  # word 1..n grams beside the char ones (0: none; 2 was within noise in CV, see docs)
    c: float = 3.0  # inverse L2 strength; 1, 3 and 10 were within noise in 5-fold CV over the JD training lists
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


def make_vectorizer(config: NgramRankerConfig):
    """The text → sparse features map (unfitted): char n-grams, and word n-grams when asked."""
    _, TfidfVectorizer, _, FeatureUnion = _sklearn()
    parts = [("char", TfidfVectorizer(analyzer="char", sublinear_tf=True,
                                      ngram_range=(config.ngram_min, config.ngram_max)))]
    if config.word_ngram_max > 0:
        jieba_words("")  # fail before fitting anything when jieba is missing
        parts.append(("word", TfidfVectorizer(analyzer="word", tokenizer=jieba_words, token_pattern=None,
                                              lowercase=False, sublinear_tf=True,
                                              ngram_range=(1, config.word_ngram_max))))
    return FeatureUnion(parts)


class NgramRanker:
    """Fit on rank lists, then ``score(texts)`` → float64[len(texts)], higher is better."""

    def __init__(self, config: NgramRankerConfig = NgramRankerConfig()):
        self.config = config
        self.vectorizer = None
        self.weights: np.ndarray | None = None

    def fit(self, lists: Sequence[RankList]) -> "NgramRanker":
        if not lists:
            raise ValueError("no rank lists to fit the n-gram ranker on")
        sparse, _, LogisticRegression, _ = _sklearn()
        texts = [text for ranklist in lists for text in ranklist.texts]
        self.vectorizer = make_vectorizer(self.config)
        features = self.vectorizer.fit_transform(texts).tocsr()
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
