"""The schedule and the batch stream every training loop shares (haoping/training.py)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from haoping.training import endless_batches, warmup_cosine_schedule


def test_schedule_warms_up_linearly_then_decays_to_a_tenth_by_cosine():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=4, total_steps=14)
    rates = []
    for _ in range(15):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # (step + 1) / warmup
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert rates[14] == pytest.approx(0.2, abs=1e-9)  # 10% of the peak at total_steps
    assert rates[9] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5), abs=1e-9)  # half way: the cosine's mid-point


def test_batches_cover_every_item_once_an_epoch_in_a_fresh_order():
    items = list(range(10))
    batches = endless_batches(items, 3, random.Random(0))
    epochs = [list(itertools.islice(batches, 3)) for _ in range(2)]
    for epoch in epochs:
        assert all(len(b) == 3 for b in epoch)
        assert len({i for b in epoch for i in b}) == 9  # the incomplete 4th batch is dropped
    assert epochs[0] != epochs[1]


def test_batches_group_similar_lengths_and_small_sets_come_whole():
    words = ["x" * n for n in range(1, 41)]
    batches = endless_batches(words, 4, random.Random(1), length=len, bucket=10)
    for batch in itertools.islice(batches, 10):
        lengths = [len(w) for w in batch]
        assert lengths == sorted(lengths) and max(lengths) - min(lengths) == 3  # one window, sorted: neighbours
    assert sorted(next(endless_batches([3, 1, 2], 8, random.Random(0)))) == [1, 2, 3]
    with pytest.raises(ValueError):
        next(endless_batches([], 4, random.Random(0)))
