"""Guard figures against reward hacking: diversity, repetition and emptiness of responses."""
from __future__ import annotations

import re

REPEAT_4 = re.compile(r"(.)\1{3,}")  # a character 4 or more times in a row


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique character n-grams / all character n-grams, over all texts."""
    grams = [text[i:i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: list[str]) -> float:
    """Share of texts with any character repeated 4 or more times in a row."""
    return sum(bool(REPEAT_4.search(t)) for t in texts) / len(texts) if texts else 0.0


def empty_rate(texts: list[str]) -> float:
    """Share of texts with no visible character."""
    return sum(not t.strip() for t in texts) / len(texts) if texts else 0.0
