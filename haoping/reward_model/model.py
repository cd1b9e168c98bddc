"""Reward-model networks: an encoder with a scalar head, loaded from any sequence classifier,
and the forward passes that turn texts into rewards."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from haoping import models
from haoping.log import get_logger

log = get_logger(__name__)

REWARD_LABEL = "reward"


def load_reward_base(ref: str, dtype: torch.dtype = torch.float32,
                     classifier: PreTrainedModel | None = None) -> PreTrainedModel:
    """An encoder with a fresh scalar head, from any sequence-classification checkpoint.

    The reference goes through :func:`haoping.models.resolve_model` (starter models, local
    dirs, hub IDs). A 2-class sentiment head is replaced by a 1-output head; when the
    positive class is known, the new head starts as (positive − negative) logit, so the
    untrained reward already ranks texts like the classifier does instead of randomly.
    """
    path = models.resolve_model(ref)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, ignore_mismatched_sizes=True, dtype=dtype)
    except OSError as err:
        raise models.ModelLoadError(f"cannot load reward-model base {ref!r}: {err}") from err
    base_labels = classifier.config.num_labels if classifier is not None else 1
    if base_labels != 1:
        log.info("base %s has a %d-label head: loading it with num_labels=1 "
                 "(ignore_mismatched_sizes=True), so the head is new", ref, base_labels)
        _init_head_from_classifier(model, classifier, ref)
    model.config.id2label = {0: REWARD_LABEL}
    model.config.label2id = {REWARD_LABEL: 0}
    model.config.problem_type = "regression"
    return model


def _init_head_from_classifier(reward: PreTrainedModel, classifier: PreTrainedModel, ref: str) -> None:
    try:
        positive = models.positive_label_index(classifier.config.id2label)
    except models.ModelLoadError as err:
        log.info("scalar head left at random init: %s", err)
        return
    negative = 1 - positive if classifier.config.num_labels == 2 else None
    reward_state = reward.state_dict()
    copied = []
    with torch.no_grad():
        for name, weight in classifier.state_dict().items():
            target = reward_state.get(name)
            # exactly the tensors ignore_mismatched_sizes re-initialised: [2, ...] → [1, ...]
            if target is None or target.shape == weight.shape or weight.shape[:1] != (2,) \
                    or target.shape != (1,) + weight.shape[1:] or negative is None:
                continue
            target.copy_((weight[positive] - weight[negative]).unsqueeze(0).to(target.dtype))
            copied.append(name)
    if copied:
        log.info("scalar head initialised from %s as positive − negative logit (%s)", ref, ", ".join(copied))
    else:
        log.info("scalar head left at random init (no 2-class head found in %s)", ref)


def load_classifier_or_none(ref: str) -> PreTrainedModel | None:
    """The base as saved (its own head), or None when it is not a sequence classifier."""
    try:
        model = models.load_sequence_classifier(ref)
    except (models.ModelLoadError, ValueError, KeyError) as err:
        log.info("%s does not load as a sequence classifier (%s); the scalar head starts random", ref, err)
        return None
    # a language model loads too, with a random head of 2 labels: nothing to start ours from
    if not any(name.endswith("ForSequenceClassification") for name in model.config.architectures or ()):
        log.info("%s was not saved as a sequence classifier; the scalar head starts random", ref)
        return None
    return model


def text_max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, wanted: int | None = None) -> int:
    """Tokens per text: what was asked, capped by the model's position embeddings."""
    limits = [n for n in (wanted, getattr(model.config, "max_position_embeddings", None),
                          tokenizer.model_max_length) if n and n < 10**6]
    return min(limits) if limits else 512


def forward_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   max_length: int, device: torch.device | str) -> Tensor:
    """Raw scalar rewards of ``texts``, one forward pass. → Tensor[len(texts)] (float32)"""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
    return model(**encoded).logits[:, 0].float()


@torch.inference_mode()
def score_in_chunks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                    max_length: int, device: torch.device | str, chunk: int = 64,
                    autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Rewards for many texts, ``chunk`` texts per forward pass. → Tensor[len(texts)]"""
    model.eval()
    # Chunks of similar length waste less compute on padding; scores go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores = torch.empty(len(texts))
    with models.autocast(device, autocast_dtype):
        for start in range(0, len(order), chunk):
            indices = order[start:start + chunk]
            chunk_scores = forward_scores(model, tokenizer, [texts[i] for i in indices], max_length, device)
            scores[indices] = chunk_scores.cpu()
    return scores


@torch.inference_mode()
def classifier_positive_probability(classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                                    texts: Sequence[str], max_length: int, device: torch.device | str,
                                    chunk: int = 64) -> Tensor:
    """P(positive) of a sentiment classifier, the baseline reward. → Tensor[len(texts)] (float64,
    so that confident texts are not all tied at 1.0)."""
    classifier.eval()
    positive = models.positive_label_index(classifier.config.id2label)
    parts = []
    for i in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[i:i + chunk]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
        parts.append(classifier(**encoded).logits.double().softmax(-1)[:, positive].cpu())
    return torch.cat(parts)
