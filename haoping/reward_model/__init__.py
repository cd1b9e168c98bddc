"""Reward models trained from human rank lists.

A reward model is an encoder with a scalar head, saved as
``AutoModelForSequenceClassification(num_labels=1)`` (safetensors) with its tokenizer, so
:class:`haoping.scorers.reward_model.RewardModelScorer` and any Hugging Face user can load it.

* :mod:`~haoping.reward_model.model`: loading the base and its head, forward passes;
* :mod:`~haoping.reward_model.data`: rank-list sources and the held-out lists that choose the checkpoint;
* :mod:`~haoping.reward_model.linear`: the char n-gram ranker (baseline and teacher);
* :mod:`~haoping.reward_model.training`: the training loop;
* :mod:`~haoping.reward_model.output`: the output directory and the printed summary.
"""
from haoping.reward_model.data import STARTER, load_ranklist_source, selection_lists, starter_ranklists
from haoping.reward_model.model import load_reward_base
from haoping.reward_model.training import TrainConfig, train_reward_model

__all__ = ["STARTER", "TrainConfig", "load_ranklist_source", "load_reward_base", "selection_lists",
           "starter_ranklists", "train_reward_model"]
