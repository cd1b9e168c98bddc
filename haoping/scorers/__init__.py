"""Scorers: texts in, rewards out. Every backend implements :class:`haoping.scorers.base.Scorer`."""
from haoping.scorers.base import ScoreResult, Scorer, ScoreCancelled, ScoreTimeout

__all__ = ["ScoreResult", "Scorer", "ScoreCancelled", "ScoreTimeout"]
