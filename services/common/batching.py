"""Batching: concurrent requests share one model batch.

:class:`DynamicBatcher` (the scorer) merges requests into one batch that runs to the end.
:class:`ContinuousBatcher` (the generator) lets requests join a running generation batch at
the next token step and answers each one as soon as its own items finished.

In both, when nothing runs, a request waits at most ``max_wait_seconds`` for company, and only
while other requests are on their way (handlers inside :meth:`arriving`): a lone request starts
at once instead of paying the window for nobody. A batch
holds at most ``max_batch_size`` items (a larger request runs alone). The queue is bounded:
when it is full, ``submit`` raises :class:`QueueFull` (RESOURCE_EXHAUSTED). Other model work
(a weight load, a warm-up) runs on the batcher's thread too, between batches: :meth:`run_when_idle`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from haoping.errors import Cancelled
from haoping.log import get_logger
from services.common import metrics

log = get_logger(__name__)


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    """The batcher was closed (the service is stopping) before this request finished."""


@dataclass
class _Pending:
    items: list
    is_cancelled: Callable[[], bool]
    future: Future = field(default_factory=Future)


@dataclass
class _Task:
    run: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Arrival:
    """A request on its way to the batcher (see :meth:`_QueuedBatcher.arriving`)."""

    def __init__(self):
        self.counted = True


class _QueuedBatcher:
    """The bounded request queue and the batcher thread both batchers share."""

    def __init__(self, service: str, max_batch_size: int, max_wait_seconds: float, max_queue: int):
        self.service = service
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue = max_queue
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._arriving = 0  # requests between arriving() and their submit()
        self._tasks: deque[_Task] = deque()  # run_when_idle's
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"{service}-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the batcher thread and wait for it: requests still queued or running get
        ShuttingDown. A process must not exit while this thread is inside a model call (torch
        aborts the interpreter: "terminate called without an active exception")."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _fail_queued(self) -> None:
        with self._cond:
            waiting = [*self._queue, *self._tasks]
            self._queue.clear()
            self._tasks.clear()
        for pending in waiting:
            pending.future.set_exception(ShuttingDown(f"{self.service} is shutting down"))

    def _loop(self) -> None:
        raise NotImplementedError

    def run_when_idle(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the batcher's thread between batches, once the running one has finished (no
        request joins it meanwhile); its result, or its exception raised here. So all model work of
        a process runs on one thread (why: :class:`services.common.server.ComputeThread`)."""
        task = _Task(fn)
        with self._cond:
            if self._closing:
                raise ShuttingDown(f"{self.service} is shutting down")
            self._tasks.append(task)
            self._cond.notify()
        return task.future.result()

    def _run_tasks(self) -> None:
        while True:
            with self._cond:
                if not self._tasks:
                    return
                task = self._tasks.popleft()
            try:
                task.future.set_result(task.run())
            except BaseException as err:  # noqa: BLE001 - the caller's to handle
                task.future.set_exception(err)

    @contextmanager
    def arriving(self):
        """Wrap a request handler from its start (validation, tokenizing) to its submit(..., arrival):
        while any request is on its way, an idle batcher waits for it (at most max_wait_seconds)."""
        arrival = Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            self._arrived(arrival)  # e.g. rejected before it was submitted

    def _arrived(self, arrival: Arrival | None) -> None:
        with self._cond:
            if arrival is not None and arrival.counted:
                arrival.counted = False
                self._arriving -= 1
                self._cond.notify()

    def _enqueue_and_wait(self, request, arrival: Arrival | None):
        """Queue ``request`` (QueueFull when the queue is full) and block for its future's result."""
        with self._cond:
            self._arrived(arrival)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.service} queue is full ({self.max_queue} requests waiting)")
            self._queue.append(request)
            metrics.QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            self._cond.notify()
        return request.future.result()


class DynamicBatcher(_QueuedBatcher):
    def __init__(self, service: str, run_batch: Callable[[list, Callable[[], bool]], tuple[list, Any]],
                 max_batch_size: int = 64, max_wait_seconds: float = 0.01, max_queue: int = 256):
        """run_batch(items, should_stop) -> (one result per item, extra shared by the batch)."""
        self.run_batch = run_batch
        super().__init__(service, max_batch_size, max_wait_seconds, max_queue)

    def submit(self, items: list, is_cancelled: Callable[[], bool] = lambda: False,
               arrival: Arrival | None = None) -> tuple[list, Any]:
        """Blocks until this request's results are ready; returns (results, extra)."""
        return self._enqueue_and_wait(_Pending(items, is_cancelled), arrival)

    def _take_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._closing and not self._tasks:
                self._cond.wait()
            if self._closing or self._tasks:
                return []
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
                if remaining <= 0 or not self._arriving:
                    break
                self._cond.wait(remaining)
            metrics.QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while not self._closing:
            self._run_tasks()
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
        self._fail_queued()


class RunningBatch(Protocol):
    """What :class:`ContinuousBatcher` drives (the generator's :class:`haoping.generation.PolicyBatch`)."""
    version: Any  # handed to every caller with its results (the policy version that produced them)

    def __len__(self) -> int: ...
    def accepting(self) -> bool: ...  # False: take no new rows for now (e.g. a weight load waits)
    def add(self, items: list) -> list: ...  # returns one key per item
    def remove(self, keys: list) -> None: ...
    def step(self) -> dict: ...  # one token for every row; {key: result} for the rows that finished
    def partial(self, key) -> Any: ...  # a running row's output so far
    def close(self) -> None: ...


@dataclass
class _Request:
    items: list
    is_cancelled: Callable[[], bool]
    on_step: Callable[[list, list[bool]], None] | None
    future: Future = field(default_factory=Future)
    keys: list = field(default_factory=list)
    results: list = field(default_factory=list)
    remaining: int = 0


class ContinuousBatcher(_QueuedBatcher):
    """Continuous (in-flight) batching for token-by-token generation.

    A request that arrives while a batch is decoding joins it at the next token step (its
    items are prefilled and merged into the running batch), as long as the running batch plus
    the request stay within ``max_batch_size`` (a larger request runs alone); requests join in
    arrival order. Every finished item leaves the batch at once, and a request is answered as
    soon as its last item finished. An idle batcher waits at most ``max_wait_seconds`` for
    requests on their way (:meth:`arriving`) before it starts a new batch. Work for a cancelled
    request stops at the next step.
    The queue of requests waiting to join is bounded (:class:`QueueFull`).
    """

    def __init__(self, service: str, open_batch: Callable[[], RunningBatch], max_batch_size: int = 256,
                 max_wait_seconds: float = 0.005, max_queue: int = 256):
        self.open_batch = open_batch
        super().__init__(service, max_batch_size, max_wait_seconds, max_queue)

    def submit(self, items: list, is_cancelled: Callable[[], bool] = lambda: False,
               on_step: Callable[[list, list[bool]], None] | None = None,
               arrival: Arrival | None = None) -> tuple[list, Any]:
        """Blocks until this request's results are ready; returns (results, the batch's version).

        ``on_step(outputs so far, finished flags)``, one entry per item, runs after every token
        step in the batcher's thread: keep it short (e.g. put a copy on a queue)."""
        return self._enqueue_and_wait(_Request(items, is_cancelled, on_step), arrival)

    def _admit(self, running: int, accepting: bool) -> list[_Request]:
        """The waiting requests that join now; blocks while there is nothing to do."""
        with self._cond:
            if not running:
                while not self._queue and not self._closing and not self._tasks:
                    self._cond.wait()
                if self._tasks:
                    return []
                deadline = time.monotonic() + self.max_wait_seconds
                while self._arriving and sum(len(r.items) for r in self._queue) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            admitted, size = [], running
            while self._queue and ((accepting and not self._tasks) or not running):
                if size and size + len(self._queue[0].items) > self.max_batch_size:
                    break
                admitted.append(self._queue.popleft())
                size += len(admitted[-1].items)
            metrics.QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            return admitted

    def _loop(self) -> None:
        batch: RunningBatch | None = None
        active: list[_Request] = []   # requests with items in the batch
        owner: dict = {}              # key -> (request, item index)
        while True:
            if self._closing:
                for request in active:
                    request.future.set_exception(ShuttingDown(f"{self.service} is shutting down"))
                if batch is not None:
                    batch.close()
                self._fail_queued()
                return
            if batch is None:
                self._run_tasks()
            running = len(batch) if batch is not None else 0
            joining = []
            for request in self._admit(running, batch is None or batch.accepting()):
                if request.is_cancelled():  # gone before its turn: no model work for it
                    request.future.set_exception(Cancelled())
                else:
                    joining.append(request)
            try:
                if joining:
                    active += joining  # failed with the batch if the prefill fails
                    if batch is None:
                        batch = self.open_batch()
                    keys = batch.add([item for r in joining for item in r.items])  # one prefill for all
                    start = 0
                    for request in joining:
                        request.keys = keys[start:start + len(request.items)]
                        request.results = [None] * len(request.items)
                        request.remaining = len(request.items)
                        start += len(request.items)
                        owner.update((key, (request, i)) for i, key in enumerate(request.keys))
                for request in [r for r in active if r.is_cancelled()]:
                    self._drop(batch, active, owner, request, Cancelled())
                if batch is not None and len(batch):
                    metrics.GENERATE_BATCH_SIZE.labels(self.service).observe(len(batch))
                    for key, result in batch.step().items():
                        request, i = owner.pop(key)
                        request.results[i] = result
                        request.remaining -= 1
                    self._answer(batch, active, owner)
            except BaseException as err:  # noqa: BLE001 - handed to every caller in the batch
                log.exception("%s batch failed", self.service)
                for request in active:
                    request.future.set_exception(err)
                active, owner = [], {}
                if batch is not None:
                    batch.close()
                batch = None
                continue
            if batch is not None and not len(batch):
                batch.close()  # lets a waiting weight load go ahead
                batch = None

    def _answer(self, batch: RunningBatch, active: list[_Request], owner: dict) -> None:
        """Progress to the callers that stream it; results to the callers whose items all finished."""
        for request in list(active):
            if request.on_step is not None:
                outputs = [batch.partial(key) if result is None else result
                           for key, result in zip(request.keys, request.results)]
                try:
                    request.on_step(outputs, [result is not None for result in request.results])
                except Exception as err:  # noqa: BLE001 - that caller's failure, not the batch's
                    self._drop(batch, active, owner, request, err)
                    continue
            if not request.remaining:
                active.remove(request)
                request.future.set_result((request.results, batch.version))

    @staticmethod
    def _drop(batch: RunningBatch, active: list[_Request], owner: dict, request: _Request,
              err: BaseException) -> None:
        batch.remove([key for key, result in zip(request.keys, request.results) if result is None])
        for key in request.keys:
            owner.pop(key, None)
        active.remove(request)
        request.future.set_exception(err)
