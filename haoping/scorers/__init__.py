"""Scorers: texts in, rewards out. Every backend implements :class:`haoping.scorers.base.Scorer`."""
from haoping.scorers.base import (ModelScorer, ScoreCancelled, Scorer, ScorerBusy, ScoreResult, ScoreTimeout,
                                  in_unit_interval)

__all__ = ["ModelScorer", "ScoreCancelled", "Scorer", "ScorerBusy", "ScoreResult", "ScoreTimeout", "in_unit_interval"]
