"""The reward-model training loop: rank loss over every ordered pair of each list, optionally
distilling a char n-gram teacher on unlabeled texts, with the kept checkpoint chosen on
held-out lists. Writes nothing itself: :mod:`haoping.reward_model.output` does."""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from haoping import models
from haoping.log import get_logger
from haoping.rank_loss import LOSS_KINDS, batch_rank_loss, pairwise_correct, ranking_metrics, split_per_list
from haoping.ranklists import RankList
from haoping.reward_model.ensemble import blend_metrics, choose_blend_weight
from haoping.reward_model.model import (
    classifier_positive_probability,
    forward_scores,
    load_classifier_or_none,
    load_reward_base,
    score_in_chunks,
    text_max_length,
)
from haoping.reward_model.output import print_summary, write_output
from haoping.training import endless_batches, warmup_cosine_schedule

log = get_logger(__name__)

TEACHER_KINDS = ("none", "ngram")


def option(default, help: str, choices: tuple | None = None):
    """A config field with the help (and choices) its command-line flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    base: str = option("starter:classifier", "encoder to start from: a sequence classifier (starter:, dir or hub id)")
    baseline: str | None = option("starter:classifier",
                                  "classifier whose P(positive) is measured beside the reward model, or none")
    linear_baseline: bool = option(True, "also fit and measure an n-gram logistic ranker on the same lists, and its "
                                         "blend with the reward model "
                                         "(needs scikit-learn)")
    linear_word_ngrams: int = option(0, "word 1..n grams (jieba's dictionary) beside the char 1-3 grams of the n-gram "
                                        "ranker; 0: char n-grams alone")
    linear_c: float = option(3.0, "inverse L2 strength of the n-gram ranker's logistic regression")
    loss: str = option("logsigmoid", "logsigmoid: -log σ(r_i - r_j) (InstructGPT); sigmoid: -σ(r_i - r_j)",
                       LOSS_KINDS)
    steps: int = option(400, "optimizer steps")
    lists_per_batch: int = option(16, "rank lists per optimizer step")
    lr: float = option(3e-4, "peak AdamW learning rate (warm-up, then cosine decay to 10%)")
    warmup_steps: int = option(50, "linear warm-up steps")
    weight_decay: float = option(0.01, "AdamW weight decay")
    eval_every: int = option(100, "evaluate (held-out and dev) every this many steps")
    max_length: int = option(128, "tokens per text")
    teacher: str = option("none", "ngram: also distill a char n-gram ranker fit on the training lists, through "
                                  "soft pair labels on unlabeled texts", TEACHER_KINDS)
    distill_weight: float = option(1.0, "weight of the distillation loss against the rank loss")
    texts_per_batch: int = option(64, "unlabeled texts per step for distillation")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", "compute dtype; bfloat16/float16 use autocast over float32 weights",
                        tuple(models.DTYPES))


def evaluate_lists(scores: Tensor, lists: Sequence[RankList], loss_kind: str) -> dict:
    per_list = split_per_list(scores.float(), lists)
    metrics = ranking_metrics(per_list)
    metrics["loss"] = float(batch_rank_loss(per_list, loss_kind))
    return metrics


def soft_pair_distillation_loss(student: Tensor, teacher: Tensor, partner: Tensor) -> Tensor:
    """Binary cross-entropy of the student's pair log-odds s_i − s_k against the teacher's pair
    probability σ(t_i − t_k), for each text i and its partner k = ``partner[i]``. Scale-free in
    the sense a rank loss is: only differences count.

    student, teacher: Tensor[B]; partner: int Tensor[B] → Tensor[]
    """
    return F.binary_cross_entropy_with_logits(student - student[partner], torch.sigmoid(teacher - teacher[partner]))


def _check(config: TrainConfig, train_lists, dev_lists, select_lists, transfer_texts) -> None:
    if config.loss not in LOSS_KINDS:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    if config.teacher not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher {config.teacher!r}; choose one of {', '.join(TEACHER_KINDS)}")
    if not train_lists or not dev_lists:
        raise ValueError("need at least one training and one dev rank list")
    if select_lists is not None and not select_lists:
        raise ValueError("the checkpoint-selection set holds no rank lists")
    if config.linear_word_ngrams < 0 or not config.linear_c > 0:
        raise ValueError("linear_word_ngrams must be 0 or more and linear_c positive")
    if config.steps < 1 or config.eval_every < 1 or config.lists_per_batch < 1 or config.texts_per_batch < 2:
        raise ValueError("steps, eval_every and lists_per_batch must be positive, texts_per_batch at least 2")
    if config.teacher != "none" and (not transfer_texts or len(transfer_texts) < 2):
        raise ValueError("distilling a teacher needs at least 2 unlabeled texts")


def _fit_linear(train_lists: Sequence[RankList], config: TrainConfig):
    from haoping.reward_model.linear import NgramRanker, NgramRankerConfig

    started = time.perf_counter()
    ranker = NgramRanker(NgramRankerConfig(word_ngram_max=config.linear_word_ngrams, c=config.linear_c)).fit(train_lists)
    log.info("char n-gram ranker fit on %d lists in %.1f s", len(train_lists), time.perf_counter() - started)
    return ranker


def train_reward_model(train_lists: Sequence[RankList], dev_lists: Sequence[RankList], out: str | Path,
                       config: TrainConfig = TrainConfig(), extra_metrics: dict | None = None,
                       select_lists: Sequence[RankList] | None = None,
                       transfer_texts: Sequence[str] | None = None) -> dict:
    """Train, keep the checkpoint with the best pairwise accuracy (whole-list accuracy breaks
    ties) on ``select_lists``, and write it with its tokenizer, ``metrics.json``, ``loss.png``
    and ``accuracy.png`` to ``out``.

    ``select_lists`` is a held-out slice of the training data, so the dev lists only measure
    the model; without it the checkpoint is chosen on the dev lists themselves, and the dev
    figures are then a little optimistic. ``transfer_texts`` are unlabeled texts on which a
    teacher (``config.teacher``) is distilled.

    ``out`` is replaced only after everything was written (see :func:`haoping.atomic.atomic_directory`),
    so a failed run never loses an earlier good model. Returns the metrics dict.
    """
    _check(config, train_lists, dev_lists, select_lists, transfer_texts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    started = time.perf_counter()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = models.pick_device(config.device)
    compute_dtype = models.parse_dtype(config.dtype)

    tokenizer = models.load_tokenizer(config.base)
    # The base's own head is needed to initialise ours; loading it once also serves the baseline.
    base_classifier = load_classifier_or_none(config.base)
    model = load_reward_base(config.base, classifier=base_classifier).to(device)
    max_length = text_max_length(model, tokenizer, config.max_length)
    log.info("reward model from %s: %.2fM parameters, %d tokens per text, %s %s",
             config.base, sum(p.numel() for p in model.parameters()) / 1e6, max_length, device, config.dtype)

    dev_texts = [text for r in dev_lists for text in r.texts]
    baseline = None
    if config.baseline:
        baseline = _baseline_metrics(config.baseline, base_classifier if config.baseline == config.base else None,
                                     dev_texts, dev_lists, max_length, device)
        log.info("baseline %s P(positive) on dev: pairwise %.3f, whole-list %.3f", config.baseline,
                 baseline["pairwise_accuracy"], baseline["list_accuracy"])
    del base_classifier

    linear = _fit_linear(train_lists, config) if config.linear_baseline or config.teacher == "ngram" else None
    linear_metrics = linear_dev_scores = None
    if config.linear_baseline:
        linear_dev_scores = torch.as_tensor(linear.score(dev_texts))
        linear_metrics = {"model": _linear_name(linear.config) + ", fit on the training lists",
                          **ranking_metrics(split_per_list(linear_dev_scores, dev_lists))}
        log.info("char n-gram ranker on dev: pairwise %.3f, whole-list %.3f",
                 linear_metrics["pairwise_accuracy"], linear_metrics["list_accuracy"])
    teacher_scores = None
    if config.teacher == "ngram":
        transfer_texts = list(transfer_texts)
        teacher_scores = torch.as_tensor(linear.score(transfer_texts), dtype=torch.float32)
    select_texts = [text for r in select_lists for text in r.texts] if select_lists is not None else None

    def evaluate(lists: Sequence[RankList], texts: list[str]) -> dict:
        scores = score_in_chunks(model, tokenizer, texts, max_length, device, autocast_dtype=compute_dtype)
        return evaluate_lists(scores, lists, config.loss)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)
    batches = endless_batches(train_lists, config.lists_per_batch, random.Random(config.seed))
    transfer_batches = None
    if teacher_scores is not None:
        transfer_batches = endless_batches(range(len(transfer_texts)), config.texts_per_batch,
                                           random.Random(config.seed + 1))
    history: dict[str, list] = {"train_step": [], "train_loss": [], "train_pairwise_accuracy": [],
                                "eval_step": [], "dev_loss": [], "dev_pairwise_accuracy": [], "dev_list_accuracy": []}
    if select_lists is not None:
        history.update(select_loss=[], select_pairwise_accuracy=[], select_list_accuracy=[])

    def record_eval(step: int) -> tuple[dict, dict]:
        """(dev metrics, metrics the checkpoint is chosen on: the selection set's, or dev's)"""
        history["eval_step"].append(step)
        metrics = evaluate(dev_lists, dev_texts)
        chosen_on = metrics
        if select_lists is not None:
            chosen_on = evaluate(select_lists, select_texts)
            for name in ("loss", "pairwise_accuracy", "list_accuracy"):
                history[f"select_{name}"].append(chosen_on[name])
        for name in ("loss", "pairwise_accuracy", "list_accuracy"):
            history[f"dev_{name}"].append(metrics[name])
        return metrics, chosen_on

    initial, initial_chosen_on = record_eval(0)
    log.info("step 0 (untrained head): dev pairwise %.3f, whole-list %.3f",
             initial["pairwise_accuracy"], initial["list_accuracy"])
    best = {"step": 0, "metrics": initial, "chosen_on": initial_chosen_on, "state": copy.deepcopy(model.state_dict())}
    select_name = "held-out" if select_lists is not None else "dev"
    pairs_right = pairs_seen = 0
    bar = tqdm(range(1, config.steps + 1), desc="reward model", unit="step")
    for step in bar:
        model.train()
        batch = next(batches)
        texts = [t for r in batch for t in r.texts]
        transfer_indices = next(transfer_batches) if transfer_batches is not None else []
        with models.autocast(device, compute_dtype):
            scores = forward_scores(model, tokenizer, texts, max_length, device)  # [Σ n_l]
            # unlabeled texts in a pass of their own, padded to their own longest: [texts_per_batch]
            student = forward_scores(model, tokenizer, [transfer_texts[i] for i in transfer_indices],
                                     max_length, device) if transfer_indices else None
        per_list = split_per_list(scores, batch)
        loss = batch_rank_loss(per_list, config.loss)
        if transfer_indices:
            partner = torch.randperm(len(transfer_indices), device=student.device)
            teacher = teacher_scores[transfer_indices].to(student.device)
            loss = loss + config.distill_weight * soft_pair_distillation_loss(student, teacher, partner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; try a lower --lr")
        for scores_of_list in per_list:
            right, total = pairwise_correct(scores_of_list.detach())
            pairs_right += right
            pairs_seen += total
        history["train_step"].append(step)
        history["train_loss"].append(loss.item())
        history["train_pairwise_accuracy"].append(pairs_right / pairs_seen)
        if step % config.eval_every == 0 or step == config.steps:
            metrics, chosen_on = record_eval(step)
            if (chosen_on["pairwise_accuracy"], chosen_on["list_accuracy"]) > \
                    (best["chosen_on"]["pairwise_accuracy"], best["chosen_on"]["list_accuracy"]):
                best = {"step": step, "metrics": metrics, "chosen_on": chosen_on,
                        "state": copy.deepcopy(model.state_dict())}
            held_out = "" if select_lists is None else \
                f"held-out pairwise {chosen_on['pairwise_accuracy']:.3f}, whole-list {chosen_on['list_accuracy']:.3f}; "
            tqdm.write(f"step {step}: train loss {loss.item():.4f}, dev loss {metrics['loss']:.4f}, {held_out}"
                       f"dev pairwise {metrics['pairwise_accuracy']:.3f}, whole-list {metrics['list_accuracy']:.3f}"
                       f" (best {select_name} {best['chosen_on']['pairwise_accuracy']:.3f} at step {best['step']})")
            pairs_right = pairs_seen = 0
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    last = {"step": config.steps, "metrics": {k: history[k][-1] for k in ("dev_pairwise_accuracy", "dev_list_accuracy")}}
    model.load_state_dict(best["state"])
    model.eval()
    ensemble = None
    if linear_dev_scores is not None and select_lists is not None:
        def score_texts(texts: list[str]) -> Tensor:
            return score_in_chunks(model, tokenizer, texts, max_length, device, autocast_dtype=compute_dtype)

        ensemble = _ensemble_metrics(score_texts, linear, select_lists, select_texts, dev_lists, dev_texts,
                                     linear_dev_scores)
        log.info("blend with the n-gram ranker (weight %.1f, chosen on held-out lists) on dev: pairwise %.3f, "
                 "whole-list %.3f", ensemble["weight_linear"], ensemble["pairwise_accuracy"], ensemble["list_accuracy"])

    result = {
        # ensemble: a measurement of the blend with the n-gram ranker; the saved model is the reward model alone
        "dev": {"reward_model": best["metrics"], "baseline": baseline, "linear": linear_metrics, "ensemble": ensemble},
        "best_step": best["step"],
        # where the kept checkpoint was chosen: "held-out" (select_lists) or "dev" (the dev lists)
        "selected_on": select_name,
        "select": None if select_lists is None else {"lists": len(select_lists), "reward_model": best["chosen_on"]},
        "last_step": {"step": last["step"], "pairwise_accuracy": last["metrics"]["dev_pairwise_accuracy"],
                      "list_accuracy": last["metrics"]["dev_list_accuracy"]},
        "untrained": initial,
        "train_lists": len(train_lists),
        "dev_lists": len(dev_lists),
        "transfer_texts": len(transfer_texts) if teacher_scores is not None else 0,
        "max_length": max_length,
        "config": asdict(config),
        "torch_threads": torch.get_num_threads(),
        **(extra_metrics or {}),
        "history": history,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_output(out, model, tokenizer, max_length, result)
    print_summary(result)
    return result


def _linear_name(config) -> str:
    words = f" + word 1-{config.word_ngram_max}-gram" if config.word_ngram_max > 0 else ""
    return f"char {config.ngram_min}-{config.ngram_max}-gram{words} logistic ranker (C {config.c:g})"


def _ensemble_metrics(score_texts, linear, select_lists: Sequence[RankList], select_texts: list[str],
                      dev_lists: Sequence[RankList], dev_texts: list[str], linear_dev_scores: Tensor) -> dict:
    """The blend weight and spreads chosen on the held-out lists, then measured on dev."""
    weight, chosen_on, model_spread, linear_spread = choose_blend_weight(
        score_texts(select_texts), torch.as_tensor(linear.score(select_texts)), select_lists)
    dev = blend_metrics(score_texts(dev_texts), linear_dev_scores, dev_lists, weight, model_spread, linear_spread)
    return {"model": "reward model blended with the n-gram ranker (measured, not saved)",
            "weight_linear": weight, "spreads": {"reward_model": model_spread, "linear": linear_spread},
            "chosen_on": chosen_on, **dev}


def _baseline_metrics(ref: str, classifier: PreTrainedModel | None, dev_texts: list[str],
                      dev_lists: Sequence[RankList], max_length: int, device: torch.device) -> dict:
    classifier = classifier if classifier is not None else models.load_sequence_classifier(ref)
    tokenizer = models.load_tokenizer(ref)
    if classifier.config.num_labels < 2:
        raise models.ModelLoadError(f"baseline {ref!r} is not a sentiment classifier (num_labels=1)")
    classifier = classifier.to(device)
    length = text_max_length(classifier, tokenizer, max_length)
    probabilities = classifier_positive_probability(classifier, tokenizer, dev_texts, length, device)
    metrics = ranking_metrics(split_per_list(probabilities, dev_lists))
    return {"model": ref, "score": "P(positive)", **metrics}
