"""Batching and the one thread for model work, in-process (no gRPC): joins, cancellation, weight
loads, batch limits, compute threads."""
import threading
import time

import pytest
import torch
from safetensors.torch import save

from haoping.errors import Cancelled
from haoping.generation import PolicyGenerator, SampleSpec, SamplingParams, sample_seed
from haoping.ppo_config import PPOConfig
from haoping.ppo_trainer import PPOTrainer
from haoping.v1 import haoping_pb2 as pb
from services.common.batching import ContinuousBatcher, DynamicBatcher, ShuttingDown
from services.common.server import ComputeThread, Draining
from services.trainer.server import TrainerService, build_parser

PROMPTS = ["刚收到货，感觉", "这部电影很", "说实话，真的很", "这次购物总的来说体验很"]


@pytest.fixture()
def slow_gen(tiny_policy):
    """The tiny policy with a few ms per forward pass, so requests can arrive mid-batch."""
    gen = PolicyGenerator(str(tiny_policy))
    gen.model.register_forward_pre_hook(lambda *_: time.sleep(0.003))
    return gen


def _specs(gen, n, seed, **params):
    return [SampleSpec(tuple(gen.encode(PROMPTS[i % 4])), SamplingParams(**{"max_new_tokens": 10, **params}),
                       sample_seed(seed, i, 0)) for i in range(n)]


class _Steps:
    """An on_step callback that lets a test wait until a request has seen ``n`` token steps."""

    def __init__(self):
        self.count = 0
        self.cond = threading.Condition()

    def __call__(self, outputs, finished):
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, timeout=30)


def _submit(batcher, items, **kwargs):
    """Submit in a thread; returns a dict that gets 'value' or 'error'."""
    out: dict = {}

    def run():
        try:
            out["value"] = batcher.submit(items, **kwargs)
        except BaseException as err:  # noqa: BLE001
            out["error"] = err
        out["done_at"] = time.monotonic()
    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def test_requests_join_mid_flight_and_equal_their_samples_alone(slow_gen):
    gen = slow_gen
    batcher = ContinuousBatcher("test-join", gen.open_batch, max_batch_size=64, max_wait_seconds=0)
    requests = [_specs(gen, 3, seed=1, max_new_tokens=16), _specs(gen, 2, seed=2, top_p=0.8),
                _specs(gen, 4, seed=3, max_new_tokens=5), _specs(gen, 1, seed=4, min_new_tokens=3)]
    steps = _Steps()
    first = _submit(batcher, requests[0], on_step=steps)
    later = []
    for n, specs in enumerate(requests[1:], 1):
        steps.wait(2 * n)  # each joins while the first one is decoding
        later.append(_submit(batcher, specs))
    for out in [first, *later]:
        out["thread"].join(30)
    assert later[1]["done_at"] < first["done_at"]  # answered when its own samples ended, not with the batch
    for specs, out in zip(requests, [first, *later]):
        samples, version = out["value"]
        alone, _ = gen.generate(specs)
        assert [s.response_ids for s in samples] == [s.response_ids for s in alone]
        assert version == 0


def test_cancelled_request_leaves_and_others_continue(slow_gen):
    gen = slow_gen
    batcher = ContinuousBatcher("test-cancel", gen.open_batch, max_batch_size=64, max_wait_seconds=0)
    cancelled = threading.Event()
    steps = _Steps()
    doomed = _submit(batcher, _specs(gen, 4, seed=5, max_new_tokens=40), is_cancelled=cancelled.is_set,
                     on_step=steps)
    keeper_specs = _specs(gen, 2, seed=6, max_new_tokens=20)
    keeper = _submit(batcher, keeper_specs)
    steps.wait(3)
    cancelled.set()
    doomed["thread"].join(30)
    assert isinstance(doomed["error"], Cancelled)
    assert steps.count < 10  # its rows stopped decoding at once
    keeper["thread"].join(30)
    assert [s.response_ids for s in keeper["value"][0]] == [s.response_ids for s in gen.generate(keeper_specs)[0]]


def test_max_batch_size_is_respected(slow_gen):
    gen = slow_gen
    sizes = []
    opened = gen.open_batch

    def open_batch():
        batch = opened()
        step = batch.step
        batch.step = lambda: (sizes.append(len(batch)), step())[1]
        return batch

    batcher = ContinuousBatcher("test-limit", open_batch, max_batch_size=6, max_wait_seconds=0)
    outs = [_submit(batcher, _specs(gen, 4, seed=10 + i, max_new_tokens=6)) for i in range(4)]
    for out in outs:
        out["thread"].join(30)
        assert len(out["value"][0]) == 4
    assert max(sizes) <= 6
    big = _submit(batcher, _specs(gen, 9, seed=20, max_new_tokens=3))  # a larger request runs alone
    big["thread"].join(30)
    assert len(big["value"][0]) == 9


def _load_case(gen):
    """A long request, a short one to arrive later, the long one's samples alone, and new weights."""
    old_specs, new_specs = _specs(gen, 2, seed=7, max_new_tokens=30), _specs(gen, 2, seed=8, max_new_tokens=8)
    expected_old = [s.response_ids for s in gen.generate(old_specs)[0]]
    torch.manual_seed(0)
    weights = save({name: p.detach() + 0.5 * torch.randn_like(p) for name, p in gen.model.named_parameters()})
    return old_specs, new_specs, expected_old, weights


def test_weight_load_waits_for_the_running_batch_and_joins_wait_for_the_load(slow_gen):
    gen = slow_gen
    batcher = ContinuousBatcher("test-load", gen.open_batch, max_batch_size=64, max_wait_seconds=0)
    old_specs, new_specs, expected_old, weights = _load_case(gen)

    steps = _Steps()
    running = _submit(batcher, old_specs, on_step=steps)
    steps.wait(2)
    loader = threading.Thread(target=gen.load_weights, args=(weights, 1))
    loader.start()
    deadline = time.monotonic() + 10
    while not gen.load_pending and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gen.load_pending
    joiner = _submit(batcher, new_specs)  # arrives while the load waits: held until the swap
    running["thread"].join(30)
    loader.join(30)
    joiner["thread"].join(30)
    samples, version = running["value"]
    assert version == 0 and [s.response_ids for s in samples] == expected_old  # no swap mid-sample
    samples, version = joiner["value"]
    assert version == 1 and gen.version == 1
    assert [s.response_ids for s in samples] == [s.response_ids for s in gen.generate(new_specs)[0]]


def test_work_run_when_idle_runs_on_the_batcher_thread_between_batches(slow_gen):
    """A weight load through run_when_idle: on the batcher's thread (the one thread that does model
    work), after the running batch finished, before a request that arrived after it."""
    gen = slow_gen
    batcher = ContinuousBatcher("test-idle", gen.open_batch, max_batch_size=64, max_wait_seconds=0)
    old_specs, new_specs, expected_old, weights = _load_case(gen)
    seen: dict = {}

    def load():
        seen["thread"] = threading.current_thread()
        seen["running_batches"] = gen._holds
        gen.load_weights(weights, 1)
        return "loaded"

    steps = _Steps()
    running = _submit(batcher, old_specs, on_step=steps)
    steps.wait(2)
    loader: dict = {}
    loader_thread = threading.Thread(target=lambda: loader.update(value=batcher.run_when_idle(load)))
    loader_thread.start()
    deadline = time.monotonic() + 10
    while not batcher._tasks and "thread" not in seen and time.monotonic() < deadline:
        time.sleep(0.001)
    joiner = _submit(batcher, new_specs)  # arrives while the load waits: joins no batch before it
    for thread in (running["thread"], loader_thread, joiner["thread"]):
        thread.join(30)
    assert loader["value"] == "loaded"
    assert seen["thread"] is batcher._thread and seen["running_batches"] == 0
    samples, version = running["value"]
    assert version == 0 and [s.response_ids for s in samples] == expected_old
    samples, version = joiner["value"]
    assert version == 1 and [s.response_ids for s in samples] == [s.response_ids for s in gen.generate(new_specs)[0]]

    with pytest.raises(ZeroDivisionError):  # the work's own error, raised to its caller
        batcher.run_when_idle(lambda: 1 / 0)
    batcher.close()
    with pytest.raises(ShuttingDown):
        batcher.run_when_idle(lambda: None)


def test_the_scorer_batcher_runs_work_on_its_thread_too():
    batcher = DynamicBatcher("test-idle", lambda items, stop: (items, None))
    assert batcher.submit([1, 2])[0] == [1, 2]
    assert batcher.run_when_idle(threading.current_thread) is batcher._thread
    batcher.close()


def _recording_batcher(sizes: list) -> DynamicBatcher:
    """A DynamicBatcher with a 30 s window whose batches just echo their items, recording their sizes."""
    return DynamicBatcher("test-arrivals", lambda items, _stop: (sizes.append(len(items)) or items, None),
                          max_batch_size=8, max_wait_seconds=30)


def test_a_lone_request_starts_at_once_instead_of_waiting_out_the_window(tiny_policy):
    sizes: list = []
    started = time.monotonic()
    assert _recording_batcher(sizes).submit([1]) == ([1], None)
    gen = PolicyGenerator(str(tiny_policy))
    continuous = ContinuousBatcher("test-lone", gen.open_batch, max_wait_seconds=30)
    assert len(continuous.submit(_specs(gen, 2, seed=1, max_new_tokens=3))[0]) == 2
    assert time.monotonic() - started < 20  # nobody else was on the way: neither waited its 30 s window


def test_the_batcher_waits_for_a_request_on_its_way_and_batches_it():
    sizes: list = []
    batcher = _recording_batcher(sizes)
    with batcher.arriving() as second:  # a handler still validating its request
        first = _submit(batcher, [1])
        time.sleep(0.3)
        assert "value" not in first  # held for the request on its way
        assert batcher.submit([2], arrival=second) == ([2], None)
    first["thread"].join(10)
    assert first["value"] == ([1], None) and sizes == [2]


def test_a_request_rejected_on_its_way_releases_the_wait():
    sizes: list = []
    batcher = _recording_batcher(sizes)
    with batcher.arriving():  # e.g. INVALID_ARGUMENT: the handler leaves without submitting
        first = _submit(batcher, [1])
        time.sleep(0.3)
    first["thread"].join(10)
    assert first["value"] == ([1], None) and sizes == [1]


def test_a_compute_thread_runs_all_work_on_one_thread_and_raises_its_errors():
    compute = ComputeThread("test-compute")
    seen: list = []
    callers = [threading.Thread(target=lambda: seen.append(compute.run(threading.current_thread))) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0] not in callers
    assert compute.run(lambda: compute.run(threading.current_thread)) is seen[0]  # nested: runs in place
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)


def test_the_trainer_service_runs_steps_and_weight_reads_on_its_compute_thread(tiny_policy):
    """Steps arrive on whichever gRPC thread is free; the model work must not follow them."""
    compute = ComputeThread("test-trainer-compute")
    trainer = compute.run(PPOTrainer, str(tiny_policy), PPOConfig(minibatch_size=2, ppo_epochs=1))
    threads: list = []
    for name in ("apply_step", "policy_weights"):
        def spy(*args, _original=getattr(trainer, name), **kwargs):
            threads.append(threading.current_thread())
            return _original(*args, **kwargs)
        setattr(trainer, name, spy)
    args = build_parser().parse_args(["--model", str(tiny_policy), "--insecure-no-auth", "--weight-group-port", "0"])
    service = TrainerService(trainer, args, Draining(), compute=compute)

    class Context:
        def abort(self, code, details):
            raise AssertionError(f"{code}: {details}")

    request = pb.StepRequest(rollouts=[pb.Rollout(query_token_ids=[5, 6], response_token_ids=[7, 8], reward=r)
                                       for r in (1.0, 0.0)])
    callers = [threading.Thread(target=service.Step, args=(request, Context())),
               threading.Thread(target=lambda: list(service.GetWeights(pb.GetWeightsRequest(), Context())))]
    for caller in callers:
        caller.start()
        caller.join(60)
    assert len(threads) == 2 and threads[0] is threads[1] and threads[0] not in callers
