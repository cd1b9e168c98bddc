"""Weight broadcast: a torch.distributed group of the trainer and its generators (docs/weight_sync.md).

In one process (ranks on threads): the exact weights arrive; older, non-finite or unfitting
weights are refused and the old ones keep serving. As services: the coordinator's broadcast sync
to two generators, and a generator SIGKILLed mid-broadcast."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, TrainerClient
from haoping.generation import PolicyGenerator
from haoping.ppo_trainer import PPOConfig, PPOTrainer
from haoping.weight_broadcast import (BroadcastFailed, Header, ReceiveBuffers, WeightGroup, WeightGroupHost,
                                      WeightsRefused, client_store, plan_header, unpack)
from services.coordinator.run import DEFAULT_PROMPTS, Coordinator, start_service, stop_services
from services.coordinator.weight_sync import BroadcastSync

TIMEOUT = 15.0  # the group's: rendezvous and every collective
PPO = json.dumps({"learning_rate": 0.01, "minibatch_size": 4, "ppo_epochs": 1})


# ------------------------------------------------------------------ the header, pure

def test_the_header_packs_every_tensor_aligned_and_round_trips():
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16),
               "c": torch.zeros(7, dtype=torch.float16), "big": torch.randn(300)}
    header = plan_header(4, tensors, bucket_bytes=256)
    assert Header.from_bytes(header.to_bytes()) == header
    assert [t.bucket for t in header.tensors] == [0, 0, 0, 1]  # "big" (1200 B) alone in a bucket of its own
    assert all(t.offset % 64 == 0 for t in header.tensors)
    buffers = [torch.zeros(n, dtype=torch.uint8) for n in header.buckets]
    for slot in header.tensors:
        buffers[slot.bucket][slot.offset:slot.offset + slot.nbytes] = tensors[slot.name].reshape(-1).view(torch.uint8)
    for name, tensor in unpack(header, buffers).items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name])
    for bad in (b"{", b'{"version": 1, "buckets": [8], "tensors": [["x", "int8", [2], 0, 0]]}',
                b'{"version": 1, "buckets": [8], "tensors": [["x", "float32", [4], 0, 0]]}'):  # 16 B in 8
        with pytest.raises(ValueError):
            Header.from_bytes(bad)


def test_large_tensors_travel_alone_and_every_byte_lies_in_a_span():
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16),
               "big": torch.randn(300), "c": torch.zeros(7), "huge": torch.randn(2000)}
    header = plan_header(1, tensors, bucket_bytes=4096, direct_bytes=1024)
    slot = {t.name: t for t in header.tensors}
    assert header.buckets[slot["huge"].bucket] == 8000  # alone in a bucket of its own
    # "a" and "b" share a packed span; "big" (1200 B) and "huge" travel alone; "c" starts a new run
    assert header.spans == ((0, 0, slot["b"].offset + 6), (0, slot["big"].offset, slot["big"].offset + 1200),
                            (0, slot["c"].offset, slot["c"].offset + 28), (1, 0, 8000))
    assert [[t.name for t in inside] for inside in header.span_slots()] == [["a", "b"], ["big"], ["c"], ["huge"]]
    assert Header.from_bytes(header.to_bytes()) == header
    raw = json.loads(header.to_bytes())
    for spans, words in (([s for s in raw["spans"] if s[1] != slot["big"].offset], "big lies in no span"),
                         (raw["spans"][::-1], "out of order"),
                         ([[0, 0, 64], [0, 32, 1400]] + raw["spans"][2:], "out of order"),  # overlapping
                         (raw["spans"][:-1] + [[1, 0, 8001]], "outside its bucket"),
                         (raw["spans"][:-1] + [[2, 0, 10]], "outside its bucket")):
        with pytest.raises(ValueError, match=words):
            Header.from_bytes(json.dumps(dict(raw, spans=spans)).encode())
    # a header without spans: each bucket whole, as before spans existed
    whole = Header.from_bytes(json.dumps({k: v for k, v in raw.items() if k != "spans"}).encode())
    assert whole.transfers == ((0, 0, header.buckets[0]), (1, 0, 8000))


def test_receive_buffers_never_hand_out_memory_a_serving_tensor_uses():
    buffers = ReceiveBuffers()
    first = buffers.spare((64, 128), [])
    serving = [first[0][:16].view(torch.float32), first[1][64:].view(torch.float32)]
    second = buffers.spare((64, 128), serving)
    assert all(b.data_ptr() != f.data_ptr() for b in second for f in first)
    assert [b.numel() for b in second] == [64, 128]
    assert buffers.spare((64, 128), serving)[0].data_ptr() == second[0].data_ptr()  # reused, not reallocated
    now_serving = [second[1][:4].view(torch.float32)]
    assert buffers.spare((64, 128), now_serving)[0].data_ptr() == first[0].data_ptr()  # turns back to the first
    # a tensor in each set (weights partly copied in): a set of its own, sharing nothing
    third = buffers.spare((64, 128), serving + now_serving)
    used = {t.data_ptr() for t in serving + now_serving}
    assert all(not b.data_ptr() <= p < b.data_ptr() + b.numel() for b in third for p in used)


# ------------------------------------------------------------------ in one process: ranks on threads

@pytest.fixture(scope="module")
def policies(tiny_policy):
    """A trainer one update past its start, and two generators still at the start."""
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=4, ppo_epochs=1, learning_rate=0.05), "cpu")
    trainer.step([[101, 5, 6]] * 4, [[7, 8, 102], [9, 10, 11], [12, 102], [13, 14, 15]], [1.0, 0.0, 0.5, -1.0])
    return trainer, [PolicyGenerator(str(tiny_policy)) for _ in range(2)]


def group_of(generators: list[PolicyGenerator], bucket_bytes: int = 4096):
    host = WeightGroupHost("127.0.0.1", 0, TIMEOUT, bucket_bytes, 8)
    opened = host.open(len(generators))
    with ThreadPoolExecutor(len(generators)) as pool:
        members = list(pool.map(lambda rank: WeightGroup(client_store("127.0.0.1", host.port, TIMEOUT),
                                                         opened.group_id, rank, opened.world, "127.0.0.1", TIMEOUT),
                                range(1, len(generators) + 1)))
    return host, opened.group_id, members


def broadcast_once(host, group_id, members, generators, version, tensors):
    """Rank 0 sends while every member receives and, if its checks pass, swaps in; per member:
    the version now served or the exception."""
    def receive(member, generator):
        try:
            got, state = member.receive(generator.check_state, 1 << 26)
            generator.swap_in(state, got)
            return generator.version
        except (WeightsRefused, BroadcastFailed) as err:
            return err

    with ThreadPoolExecutor(len(members)) as pool:
        outcomes = [pool.submit(receive, m, g) for m, g in zip(members, generators)]
        report = host.broadcast(group_id, version, tensors)
        return report, [o.result(timeout=TIMEOUT * 2) for o in outcomes]


def params_of(generator: PolicyGenerator) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in generator.model.named_parameters()}


def test_a_broadcast_gives_every_generator_the_trainers_exact_weights(policies):
    trainer, generators = policies
    state = trainer.policy_state()
    assert any(not torch.equal(state[n], p) for n, p in params_of(generators[0]).items())  # they differ before
    host, group_id, members = group_of(generators)
    report, outcomes = broadcast_once(host, group_id, members, generators, trainer.version, state)
    assert outcomes == [trainer.version] * 2 and report.refused_ranks == []
    assert len(Header.from_bytes(plan_header(1, state, 4096).to_bytes()).buckets) > 1  # several buckets
    for generator in generators:
        received = params_of(generator)
        assert received.keys() == state.keys()
        for name, tensor in state.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    # and again with the next version, through the same group and buffers
    shifted = {name: tensor + 1 for name, tensor in state.items()}
    report, outcomes = broadcast_once(host, group_id, members, generators, trainer.version + 1, shifted)
    assert outcomes == [trainer.version + 1] * 2
    assert all(torch.equal(params_of(g)[n], shifted[n]) for g in generators for n in shifted)


def test_older_non_finite_and_unfitting_weights_are_refused_and_the_old_ones_keep_serving(policies, tiny_policy):
    trainer, generators = policies
    host, group_id, members = group_of(generators)
    state = trainer.policy_state()
    report, outcomes = broadcast_once(host, group_id, members, generators, 10, state)
    assert outcomes == [10, 10]
    serving = [params_of(g) for g in generators]
    name = next(iter(state))
    poisoned = dict(state, **{name: state[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    reshaped = dict(state, **{name: state[name].reshape(-1)[:-1].clone()})
    renamed = {("x." + n if n == name else n): t for n, t in state.items()}
    for version, tensors, words in ((9, state, "older"), (11, poisoned, "non-finite"),
                                    (11, reshaped, "shape"), (11, renamed, "missing")):
        report, outcomes = broadcast_once(host, group_id, members, generators, version, tensors)
        assert report.refused_ranks == [1, 2], words
        assert all(isinstance(o, WeightsRefused) and words in str(o) for o in outcomes), (words, outcomes)
        for generator, before in zip(generators, serving):
            assert generator.version == 10
            assert all(torch.equal(p, before[n]) for n, p in params_of(generator).items()), words
    # no weights at all this time (the version asked for is not the trainer's): nobody waits it out
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        waiting = [pool.submit(m.receive, g.check_state, 1 << 26) for m, g in zip(members, generators)]
        host.cancel(group_id, 13, "policy version 13 is not available")
        for future in waiting:
            with pytest.raises(WeightsRefused, match="not available"):
                future.result(timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
    # the group stays usable, and the generators still generate
    report, outcomes = broadcast_once(host, group_id, members, generators, 12, state)
    assert outcomes == [12, 12]
    from haoping.generation import SampleSpec, SamplingParams
    samples, version = generators[0].generate([SampleSpec((101, 5), SamplingParams(max_new_tokens=3), seed=1)])
    assert version == 12 and len(samples[0].response_ids) >= 1


def test_weights_received_into_spare_buffers_become_the_parameters_and_a_refusal_leaves_them_alone(tiny_policy):
    """The generator's path: spans straight into the buckets the model does not serve from, the
    views adopted as its parameters (no copy); a refused broadcast lands in the other set, so the
    serving weights stay bit for bit; a pull in between copies into the serving set in place."""
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=4, ppo_epochs=1, learning_rate=0.05), "cpu")
    trainer.step([[101, 5, 6]] * 4, [[7, 8, 102], [9, 10, 11], [12, 102], [13, 14, 15]], [1.0, 0.0, 0.5, -1.0])
    live = trainer.policy_state()  # the trainer's parameters themselves: large ones are sent from there
    state = {name: tensor.clone() for name, tensor in live.items()}
    generators = [PolicyGenerator(str(tiny_policy)) for _ in range(2)]
    host = WeightGroupHost("127.0.0.1", 0, TIMEOUT, 4096, 8, direct_bytes=1024)
    opened = host.open(2)
    with ThreadPoolExecutor(2) as pool:
        members = list(pool.map(lambda rank: WeightGroup(client_store("127.0.0.1", host.port, TIMEOUT),
                                                         opened.group_id, rank, 3, "127.0.0.1", TIMEOUT), (1, 2)))
    pools = [ReceiveBuffers() for _ in generators]
    handed: list[list[list[torch.Tensor]]] = [[], []]

    def receive(index):
        generator = generators[index]

        def into(sizes):
            handed[index].append(pools[index].spare(sizes, generator.model.parameters()))
            return handed[index][-1]
        try:
            got, received = members[index].receive(generator.check_state, 1 << 26, into=into)
            generator.swap_in(received, got, adopt=True)
            return generator.version
        except WeightsRefused as err:
            return err

    def broadcast(version, tensors):
        with ThreadPoolExecutor(2) as pool:
            outcomes = [pool.submit(receive, i) for i in range(2)]
            report = host.broadcast(opened.group_id, version, tensors)
            return report, [o.result(timeout=TIMEOUT * 2) for o in outcomes]

    def lies_in(tensor, buffers):
        return any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() for b in buffers)

    header = plan_header(1, state, 4096, 1024)
    assert any(len(inside) == 1 for inside in header.span_slots()) and any(len(i) > 1 for i in header.span_slots())
    # a non-contiguous large tensor is packed, not sent from its storage, and arrives the same
    wte = "transformer.wte.weight"
    transposed = dict(live, **{wte: state[wte].t().contiguous().t()})
    assert not transposed[wte].is_contiguous()
    report, outcomes = broadcast(1, transposed)
    assert outcomes == [1, 1] and report.refused_ranks == []
    assert set(report.phases) == {"header", "pack", "transfer", "status"}
    assert set(members[0].last_phases) == {"header", "transfer", "check", "status"}
    for index, generator in enumerate(generators):
        for name, p in generator.model.named_parameters():
            assert torch.equal(p, state[name]) and lies_in(p, handed[index][-1]), name  # adopted: no copy
    serving = [params_of(g) for g in generators]
    name = next(iter(state))
    poisoned = dict(state, **{name: state[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    report, outcomes = broadcast(2, poisoned)
    assert report.refused_ranks == [1, 2] and all(isinstance(o, WeightsRefused) for o in outcomes)
    for index, (generator, before) in enumerate(zip(generators, serving)):
        assert generator.version == 1
        assert not any(lies_in(b, handed[index][0]) for b in handed[index][1])  # the refused ones went elsewhere
        for n, p in generator.model.named_parameters():
            assert torch.equal(p, before[n]) and lies_in(p, handed[index][0]), n
    # accepted again: into the other set, which now serves
    shifted = {n: t + 1 for n, t in state.items()}
    report, outcomes = broadcast(3, shifted)
    assert outcomes == [3, 3]
    for index, generator in enumerate(generators):
        assert all(torch.equal(p, shifted[n]) and lies_in(p, handed[index][2]) and not lies_in(p, handed[index][0])
                   for n, p in generator.model.named_parameters())
    # a pull copies into the serving set in place; the next broadcast still lands beside it
    from safetensors.torch import save
    generators[0].load_weights(save(state), 4)
    assert all(torch.equal(p, state[n]) and lies_in(p, handed[0][2]) for n, p in generators[0].model.named_parameters())
    report, outcomes = broadcast(5, shifted)
    assert outcomes == [5, 5]
    assert all(torch.equal(p, shifted[n]) for g in generators for n, p in g.model.named_parameters())
    assert all(torch.equal(t, state[n]) for n, t in live.items())  # the sender's own storage untouched
    from haoping.generation import SampleSpec, SamplingParams
    samples, version = generators[1].generate([SampleSpec((101, 5), SamplingParams(max_new_tokens=3), seed=1)])
    assert version == 5 and len(samples[0].response_ids) >= 1


# ------------------------------------------------------------------ as services

@pytest.fixture(scope="module")
def stack(tiny_policy, tiny_classifier, tmp_path_factory):
    """A trainer and two generators, shared by the tests below (the last one kills a generator)."""
    run_dir = tmp_path_factory.mktemp("broadcast")
    (run_dir / "logs").mkdir()
    services = []
    try:
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--ppo-config", PPO, "--device", "cpu",
                                                  "--weight-group-port", "0", "--weight-group-timeout", str(TIMEOUT),
                                                  "--weight-bucket-mb", "1", "--checkpoint-dir", str(run_dir / "checkpoints")],
                                      run_dir, timeout=120))
        for label in ("generator", "generator-2"):
            services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                        "--trainer-address", services[0].address], run_dir,
                                          timeout=120, label=label))
        token = dict(token_file=services[0].token_file, timeout=60)
        clients = [GeneratorClient(g.address, **token) for g in services[1:]]
        with TrainerClient(services[0].address, **token) as trainer:
            yield SimpleNamespace(trainer=trainer, generators=clients, services=services, run_dir=run_dir,
                                  token=token)
        for client in clients:
            client.close()
    finally:
        stop_services(services)


def seeded_samples(client: GeneratorClient) -> list:
    response = client.generate(DEFAULT_PROMPTS[:2], n=3, max_new_tokens=8, seed=3)
    return [list(s.response_token_ids) for s in response.samples]


def trainer_metric(service, outcome: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f'haoping_weight_broadcasts_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_the_coordinator_syncs_by_broadcast_like_the_pull(stack, tiny_classifier):
    scorer = start_service("scorer", ["--model", str(tiny_classifier), "--device", "cpu"], stack.run_dir, timeout=120)
    stack.services.append(scorer)
    args = SimpleNamespace(prompts=DEFAULT_PROMPTS, samples_per_prompt=2, max_new_tokens=6, eval_samples=4, seed=0,
                           cycles=2, max_seconds=0.0, min_new_tokens=2, max_kl=6.0, min_distinct2_ratio=0.5,
                           max_repetition_rate=0.1, weight_sync="broadcast")
    trainer_address = stack.services[0].address
    with GeneratorReplicas([GeneratorClient(c.address, **stack.token) for c in stack.generators]) as replicas, \
            ScorerClient(scorer.address, **stack.token) as scores:
        records = Coordinator(args, replicas, scores, stack.trainer, trainer_address, stack.run_dir).run()
        assert [r["weight_sync"] for r in records] == ["broadcast", "broadcast"]
        assert [c.info().policy_version for c in replicas.clients] == [2, 2]
        by_broadcast = [seeded_samples(c) for c in replicas.clients]
        # the same version pulled gives the same samples: the same weights
        assert replicas.clients[0].load_weights(trainer_address).policy_version == 2
        assert seeded_samples(replicas.clients[0]) == by_broadcast[0] == by_broadcast[1]
    assert trainer_metric(stack.services[0], "ok") == 2
    assert trainer_metric(stack.services[0], "failed") == 0


@pytest.mark.slow
def test_haoping_run_with_broadcast_weight_sync(tiny_policy, tiny_classifier, tmp_path):
    command = [sys.executable, "-m", "services.cli", "run", "--policy", str(tiny_policy), "--scorer-model",
               str(tiny_classifier), "--cycles", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6",
               "--min-new-tokens", "2", "--eval-samples", "4", "--runs-dir", str(tmp_path), "--name", "bcast",
               "--ppo-config", PPO, "--device", "cpu", "--generator-replicas", "2", "--weight-sync", "broadcast"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    cycles = [json.loads(line) for line in (tmp_path / "bcast" / "cycles.jsonl").read_text().splitlines()]
    assert [c["weight_sync"] for c in cycles] == ["broadcast", "broadcast"]
    assert [c["policy_version"] for c in cycles] == [1, 2]


@pytest.mark.slow
def test_a_generator_killed_mid_broadcast_fails_it_in_time_and_the_rest_carry_on(stack):
    sync = BroadcastSync(stack.trainer, stack.services[0].address)
    version = sync.sync(stack.generators).policy_version
    failed, ok = trainer_metric(stack.services[0], "failed"), trainer_metric(stack.services[0], "ok")
    victim = stack.services[2].process
    os.kill(victim.pid, signal.SIGSTOP)  # frozen: the broadcast starts and cannot finish
    outcome = {}

    def run():
        started = time.monotonic()
        try:
            sync.sync(stack.generators)
        except grpc.RpcError as err:
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive()  # the trainer is inside the broadcast, waiting for the frozen generator
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(TIMEOUT + 10)
    assert not thread.is_alive() and "error" in outcome
    assert outcome["seconds"] < TIMEOUT, outcome  # the dead member's sockets reset: well within the timeout
    assert trainer_metric(stack.services[0], "failed") == failed + 1
    survivor = stack.generators[0]
    assert survivor.load_weights().policy_version == version  # the pull still works
    assert seeded_samples(survivor)
    # a new group of the survivors broadcasts again
    assert sync.sync([survivor]).policy_version == version
    assert trainer_metric(stack.services[0], "ok") == ok + 1
