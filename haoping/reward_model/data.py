"""Where rank lists come from: TSV files, starter lists built from the corpus, and the held-out
lists that choose the checkpoint (never the dev lists, unless asked)."""
from __future__ import annotations

import random
from collections.abc import Sequence

from haoping.corpus import load_reviews, split_reviews
from haoping.log import get_logger
from haoping.ranklists import LineProblem, RankList, build_starter_ranklists, read_ranklists

log = get_logger(__name__)

STARTER = "starter"  # --train/--dev value: rank lists built from the corpus, see haoping.ranklists
SELECT_KINDS = ("auto", "dev", "slice", STARTER)  # or a rank-list TSV
MIN_LISTS_TO_SLICE = 10


def starter_ranklists(split: str, count: int, seed: int = 0) -> list[RankList]:
    """Starter lists from the corpus' fixed split: ``train`` or ``heldout`` (disjoint reviews)."""
    train, heldout = split_reviews(load_reviews(), seed=0, heldout_fraction=0.1)
    reviews = {"train": train, "heldout": heldout}[split]
    return build_starter_ranklists(reviews, count, seed=seed)


def report_problems(source: str, problems: Sequence[LineProblem], shown: int = 20) -> None:
    for problem in problems[:shown]:
        log.warning("%s: skipped %s", source, problem)
    if len(problems) > shown:
        log.warning("%s: skipped %d more bad lines", source, len(problems) - shown)


def _skipped(problems: Sequence[LineProblem]) -> list[dict]:
    return [{"line": p.line, "reason": p.reason} for p in problems]


def load_ranklist_source(source: str, strict: bool, starter_split: str, starter_count: int,
                         seed: int) -> tuple[list[RankList], dict]:
    """Rank lists from a TSV file or, for ``starter``, built from the corpus."""
    if source == STARTER:
        lists = starter_ranklists(starter_split, starter_count, seed)
        log.info("%d starter rank lists from the corpus' %s split", len(lists), starter_split)
        return lists, {"source": f"starter:{starter_split}", "lists": len(lists), "skipped_lines": []}
    lists, problems = read_ranklists(source, strict=strict)
    report_problems(source, problems)
    log.info("%s: %d rank lists, %d bad lines skipped", source, len(lists), len(problems))
    return lists, {"source": source, "lists": len(lists), "skipped_lines": _skipped(problems)}


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
    report_problems(select, problems)
    return train, lists, {"source": select, "lists": len(lists), "skipped_lines": _skipped(problems)}
