"""Dynamic batching: concurrent requests are merged into one model batch.

A request waits at most ``max_wait_seconds`` for company; a batch holds at most
``max_batch_size`` items (a larger request runs alone). The queue is bounded: when it is
full, :meth:`DynamicBatcher.submit` raises :class:`QueueFull` (RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from haoping.generation import Cancelled
from services.common import metrics


class QueueFull(Exception):
    pass


@dataclass
class _Pending:
    items: list
    is_cancelled: Callable[[], bool]
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    def __init__(self, service: str, run_batch: Callable[[list, Callable[[], bool]], tuple[list, Any]],
                 max_batch_size: int = 64, max_wait_seconds: float = 0.01, max_queue: int = 256):
        """run_batch(items, should_stop) -> (one result per item, extra shared by the batch)."""
        self.service = service
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name=f"{service}-batcher", daemon=True).start()

    def submit(self, items: list, is_cancelled: Callable[[], bool] = lambda: False) -> tuple[list, Any]:
        """Blocks until this request's results are ready; returns (results, extra)."""
        pending = _Pending(items, is_cancelled)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.service} queue is full ({self.max_queue} requests waiting)")
            self._queue.append(pending)
            metrics.QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            self._cond.notify()
        return pending.future.result()

    def _take_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.max_wait_seconds
            while size < self.max_batch_size:
                if self._queue:
                    if size + len(self._queue[0].items) > self.max_batch_size:
                        break
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].items)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            metrics.QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = []
            for pending in self._take_batch():
                if pending.is_cancelled():  # gone before its turn: no model work for it
                    pending.future.set_exception(Cancelled())
                else:
                    batch.append(pending)
            if not batch:
                continue
            items = [item for p in batch for item in p.items]
            metrics.GENERATE_BATCH_SIZE.labels(self.service).observe(len(items))
            try:
                results, extra = self.run_batch(items, lambda: all(p.is_cancelled() for p in batch))
            except BaseException as err:  # noqa: BLE001 - handed to every caller of this batch
                for p in batch:
                    p.future.set_exception(err)
                continue
            start = 0
            for p in batch:
                p.future.set_result((results[start:start + len(p.items)], extra))
                start += len(p.items)
