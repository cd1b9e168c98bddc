"""What every training loop here shares: the learning-rate schedule and the stream of batches."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from transformers import get_scheduler

Item = TypeVar("Item")


def lr_factors(name: str, warmup_steps: int, total_steps: int, **options) -> Callable[[int], float]:
    """step -> learning-rate factor of transformers.get_scheduler's schedule ``name``, except that
    warm-up counts the step about to run as done ((step + 1) / warmup), so the first step learns
    at 1/warmup of the peak rather than not at all."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_scheduler(name, dummy, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                           scheduler_specific_kwargs=options or None).lr_lambdas[0]
    return lambda step: factor(step + 1) if step < warmup_steps else factor(step)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           min_lr_rate: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_rate`` of the peak at
    ``total_steps``; call ``.step()`` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factors("cosine_with_min_lr", warmup_steps, total_steps, min_lr_rate=min_lr_rate))


def endless_batches(items: Sequence[Item], batch_size: int, rng: random.Random,
                    length: Callable[[Item], int] | None = None, bucket: int = 50) -> Iterator[list[Item]]:
    """Endless shuffled batches of ``batch_size`` items, a fresh order every epoch.

    With ``length``, items are sorted by it within windows of ``bucket`` batches and the batches
    shuffled again, so a batch holds items of similar length and little compute goes to padding.
    The incomplete last batch of an epoch is dropped, unless there are fewer items than one batch:
    then every batch is all of them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if not items:
        raise ValueError("no items to batch")
    size = min(batch_size, len(items))
    while True:
        order = list(items)
        rng.shuffle(order)
        if length is None:
            yield from (order[start:start + size] for start in range(0, len(order) - size + 1, size))
            continue
        batches = []
        for start in range(0, len(order), size * bucket):
            window = sorted(order[start:start + size * bucket], key=length)
            batches += [window[i:i + size] for i in range(0, len(window) - size + 1, size)]
        rng.shuffle(batches)
        yield from batches
