"""A/B measurements of fixed per-step costs: two variants of one thing, interleaved in one run.

    python -m bench.ab snapshot [--real-size] [--repeats N]
    python -m bench.ab interceptors [--repeats N]
    python -m bench.ab weight_load [--real-size] [--repeats N]

``snapshot``: the rollback snapshot ``PPOTrainer.guarded_step`` takes before every update. A is
the former one (a clone of the whole model's state dict and a deep copy of the optimizer's state
dict), B the current one (the optimizer's parameters copied into kept buffers, its state
cloned). Both are timed alone and as part of a whole guarded step on the same 64 rollouts, the
variants alternating; each rolls back a poisoned step exactly (checked here too). Prints the
medians and the load average before and after.

``interceptors``: the per-call cost of the three server interceptors every service runs
(metrics, error mapping, bearer token). Two gRPC servers in this process serve the same
protected echo method, one with the interceptors and one without; a client calls each in
alternating rounds of 200 unary calls of 1 KB (with the token), medians of the rounds.

``weight_load``: the generator's side of a weight sync, from the trainer's streamed chunks (as
received: deserialized WeightsChunk messages) to the weights in the model. A is the former
path (the chunks listed, joined with bytearray.extend, copied to bytes, parsed by
safetensors.torch.load into new tensors, checked, copied into the parameters), B the current one
(each chunk copied into a buffer of the announced size and hashed as it arrives, the tensors
read in place by haoping.generation.safetensors_views, checked, copied into the parameters).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from haoping.log import setup_logging
from haoping.ppo_trainer import PPOConfig, PPOTrainer


def full_snapshot(trainer: PPOTrainer) -> dict:
    """The former snapshot: every tensor of the model and of the optimizer's state dict."""
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "kl_ctl": copy.deepcopy(trainer.kl_ctl.__dict__),
            "score_moments": copy.deepcopy(trainer.score_moments.__dict__) if trainer.score_moments else None,
            "counters": (trainer.version, trainer.steps_done, trainer._weights_cache),
            "rng": torch.get_rng_state()}


def full_restore(trainer: PPOTrainer, snapshot: dict) -> None:
    with torch.no_grad():
        trainer.model.load_state_dict(snapshot["model"])
    trainer.optimizer.load_state_dict(snapshot["optimizer"])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.kl_ctl.__dict__.update(snapshot["kl_ctl"])
    if trainer.score_moments is not None:
        trainer.score_moments.__dict__.update(snapshot["score_moments"])
    trainer.version, trainer.steps_done, trainer._weights_cache = snapshot["counters"]
    torch.set_rng_state(snapshot["rng"])


VARIANTS = {
    "A full state dict": (full_snapshot, full_restore),
    "B optimizer params into kept buffers": (PPOTrainer._snapshot, PPOTrainer._restore),
}


def rollouts(trainer: PPOTrainer, n: int = 64, seed: int = 0) -> tuple[list, list, list]:
    generator = torch.Generator().manual_seed(seed)
    vocab = trainer.model.lm.config.vocab_size
    queries = [[2] + torch.randint(5, vocab, (6,), generator=generator).tolist() for _ in range(n // 16)] * 16
    responses = [torch.randint(5, vocab, (16,), generator=generator).tolist() for _ in range(n)]
    scores = torch.rand(n, generator=generator).tolist()
    return queries, responses, scores


def state_of(trainer: PPOTrainer) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            copy.deepcopy(trainer.optimizer.state_dict()["state"]))


def rolls_back_exactly(trainer: PPOTrainer, batch) -> bool:
    """A step whose value head turns NaN is undone to the bit, with this variant installed."""
    before = state_of(trainer)
    poison = trainer.model.value_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    try:
        trainer.guarded_step(*batch)
        return False
    except Exception:
        pass
    finally:
        poison.remove()
    after = state_of(trainer)
    same_model = all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    same_optimizer = all(torch.equal(torch.as_tensor(v), torch.as_tensor(after[1][pid][key]))
                         for pid, s in before[1].items() for key, v in s.items())
    return same_model and same_optimizer


def ab_snapshot(policy: str, repeats: int, whole_steps: bool = True) -> dict:
    trainer = PPOTrainer(policy, PPOConfig())
    batch = rollouts(trainer)
    trainer.guarded_step(*batch)  # the optimizer holds state from here on
    seconds = {name: {"snapshot": [], "guarded_step": []} for name in VARIANTS}
    exact = {}
    for round_ in range(repeats):
        for name, (snap, restore) in VARIANTS.items():
            PPOTrainer._snapshot, PPOTrainer._restore = snap, restore
            try:
                start = time.perf_counter()
                snapshot = trainer._snapshot()
                seconds[name]["snapshot"].append(time.perf_counter() - start)
                del snapshot
                if whole_steps:
                    start = time.perf_counter()
                    trainer.guarded_step(*batch)
                    seconds[name]["guarded_step"].append(time.perf_counter() - start)
                    if round_ == 0:
                        exact[name] = rolls_back_exactly(trainer, batch)
            finally:
                PPOTrainer._snapshot, PPOTrainer._restore = VARIANTS["B optimizer params into kept buffers"]
    return {name: {"snapshot_s": statistics.median(s["snapshot"]),
                   "guarded_step_s": statistics.median(s["guarded_step"]) if whole_steps else float("nan"),
                   "rolls_back_exactly": exact.get(name, "not run")} for name, s in seconds.items()}


def ab_interceptors(repeats: int, calls: int = 200) -> dict:
    from concurrent import futures

    import grpc

    from services.common.security import ServerSecurity
    from services.common.server import server_interceptors

    token = "bench-token"
    method = "/haoping.v1.Trainer/BenchEcho"  # not a read method: all three interceptors act on it
    security = ServerSecurity(token, False, False, None, None)
    echo = grpc.method_handlers_generic_handler("haoping.v1.Trainer", {
        "BenchEcho": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    servers, stubs, channels = {}, {}, []
    for name, interceptors in (("A no interceptors", []), ("B metrics + errors + auth", None)):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             interceptors=server_interceptors("bench", security) if interceptors is None else [])
        server.add_generic_rpc_handlers((echo,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        servers[name], stubs[name] = server, channel.unary_unary(method)
    payload, metadata = b"x" * 1024, (("authorization", f"Bearer {token}"),)
    per_call: dict[str, list[float]] = {name: [] for name in stubs}
    try:
        for name, stub in stubs.items():  # warm-up
            for _ in range(20):
                assert stub(payload, metadata=metadata, timeout=10) == payload
        for _ in range(repeats):
            for name, stub in stubs.items():
                start = time.perf_counter()
                for _ in range(calls):
                    stub(payload, metadata=metadata, timeout=10)
                per_call[name].append((time.perf_counter() - start) / calls)
    finally:
        for channel in channels:
            channel.close()
        for server in servers.values():
            server.stop(0)
    return {name: {"per_call_us": 1e6 * statistics.median(v)} for name, v in per_call.items()}


def ab_weight_load(policy: str, repeats: int) -> dict:
    import hashlib

    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save

    from haoping import generation
    from haoping.generation import PolicyGenerator
    from haoping.v1 import haoping_pb2 as pb
    from services.generator.server import assemble_weights
    from services.trainer.server import CHUNK_BYTES

    generator = PolicyGenerator(policy)
    data = save({n: p.detach().clone() for n, p in generator.model.named_parameters()})
    sha = hashlib.sha256(data).hexdigest()
    wire = [pb.WeightsChunk(policy_version=1, offset=o, total_bytes=len(data), data=data[o:o + CHUNK_BYTES],
                            sha256=sha).SerializeToString() for o in range(0, len(data), CHUNK_BYTES)]

    def stream():  # what the gRPC stream hands over: one message deserialized at a time
        for raw in wire:
            yield pb.WeightsChunk.FromString(raw)

    def former():
        chunks = list(stream())
        joined = bytearray()
        for chunk in chunks:
            joined.extend(chunk.data)
        assert hashlib.sha256(joined).hexdigest() == chunks[0].sha256
        views = generation.safetensors_views
        generation.safetensors_views = lambda data: load_safetensors(data)  # the former parse: new tensors
        try:
            generator.load_weights(bytes(joined), chunks[0].policy_version)
        finally:
            generation.safetensors_views = views

    def current():
        buffer, version = assemble_weights(stream(), None, 1 << 40)
        generator.load_weights(buffer, version)

    variants = {"A list, join, bytes, safetensors.load": former, "B streamed into one buffer, views": current}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"seconds": statistics.median(v), "gb_per_s": len(data) / statistics.median(v) / 1e9,
                   "bytes": len(data)} for name, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["snapshot", "interceptors", "weight_load"])
    parser.add_argument("--real-size", action="store_true", help="the policy of bench/real_size.py (~100M)")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args(argv)
    setup_logging(os.environ.get("HAOPING_LOG_LEVEL", "WARNING"))
    if options.what == "interceptors":
        load_before = os.getloadavg()
        results = ab_interceptors(options.repeats)
        load_after = os.getloadavg()
        for name, r in results.items():
            print(f"{name:<30} {r['per_call_us']:8.0f} us per unary call")
        print(f"{options.repeats} rounds, medians; load average before {load_before}, after {load_after}")
        return 0
    if options.real_size:
        from bench.real_size import build_real_size_policy
        policy = str(build_real_size_policy())
    else:
        from haoping.models import resolve_model
        policy = resolve_model("starter:policy")
    load_before = os.getloadavg()
    if options.what == "weight_load":
        results = ab_weight_load(policy, options.repeats)
        load_after = os.getloadavg()
        for name, r in results.items():
            print(f"{name:<40} {r['seconds']:8.4f} s  {r['gb_per_s']:6.2f} GB/s  ({r['bytes'] / 1e6:.1f} MB)")
        print(f"policy {policy}; {options.repeats} rounds, medians; load average before {load_before}, "
              f"after {load_after}")
        return 0
    # at the real size a step takes most of a minute: there only the snapshots are timed
    results = ab_snapshot(policy, options.repeats, whole_steps=not options.real_size)
    load_after = os.getloadavg()
    print(f"{'variant':<40} {'snapshot s':>11} {'guarded step s':>15}  exact rollback")
    for name, r in results.items():
        print(f"{name:<40} {r['snapshot_s']:11.4f} {r['guarded_step_s']:15.3f}  {r['rolls_back_exactly']}")
    print(f"policy {policy}; {options.repeats} rounds, medians; load average before {load_before}, after {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
