"""`make bench-weight-sync`: trainer -> 2 generators weight sync of a GPT-2-base-sized policy.

A random GPT-2 (12 layers, 768 wide, vocab 21128: ~102M parameters, ~0.41 GB in float32) made
here from a config (nothing downloaded), served by a real trainer and two real generators, and
synced three ways in one run, interleaved round by round so background load hits all alike:

  broadcast  Trainer.BroadcastWeights + Generator.ReceiveWeights in a torch.distributed (gloo)
             group: what `haoping run --weight-sync broadcast` does each cycle
  pull       Generator.LoadWeights on both generators at once (each pulls the safetensors file
             over gRPC from the trainer): `haoping run`'s default
  raw        a safetensors save_file + load_file of the same tensors in this process, one copy:
             the floor a file-based handover would cost

Figures: seconds (median of the timed rounds; best in brackets), effective GB/s = the policy's
bytes / seconds (every generator holds them at the end; x2 for the bytes delivered in all), and
the ratios broadcast/raw and pull/broadcast. Targets: broadcast >= 1 GB/s effective and at most
2x the raw save + load. Writes the figures as JSON to --out. `--starter` syncs the 5.3 MB starter
policy instead, where the fixed costs of each method decide.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from haoping.client import GeneratorClient, GeneratorReplicas, TrainerClient
from haoping.log import setup_logging
from haoping.models import resolve_model
from services.coordinator.run import start_service, stop_services
from services.coordinator.weight_sync import BroadcastSync

WORK = Path("bench/run/weight-sync")
GPT2_BASE = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=21128)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_policy(directory: Path, config: dict, seed: int = 0) -> int:
    """A random GPT-2 of ``config`` with a character vocabulary of its size; returns its parameters."""
    from transformers import BertTokenizer, GPT2Config, GPT2LMHeadModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + [chr(0x4E00 + i) for i in range(config["vocab_size"] - len(SPECIAL))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.weight_sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method, after one warm-up")
    parser.add_argument("--bucket-mb", type=int, default=128, help="the trainer's --weight-bucket-mb")
    parser.add_argument("--layers", type=int, default=GPT2_BASE["n_layer"], help="smaller for a quick try")
    parser.add_argument("--starter", action="store_true",
                        help="sync the starter policy (5.3 MB) instead: where fixed costs decide")
    parser.add_argument("--out", help="default: bench/run/weight-sync/weight_sync[_starter].json")
    args = parser.parse_args(argv)
    setup_logging()
    started_load = load_average()
    run_dir = WORK
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    out = args.out or str(WORK / ("weight_sync_starter.json" if args.starter else "weight_sync.json"))
    if args.starter:
        policy = Path(resolve_model("starter:policy"))
        parameters = sum(t.numel() for t in load_file(str(policy / "model.safetensors")).values())
        print(f"policy: the starter policy, {parameters / 1e6:.2f}M parameters", flush=True)
    else:
        policy = run_dir / "policy"
        parameters = make_policy(policy, {**GPT2_BASE, "n_layer": args.layers})
        print(f"policy: random GPT-2, {args.layers} layers x {GPT2_BASE['n_embd']}, vocab {GPT2_BASE['vocab_size']}: "
              f"{parameters / 1e6:.1f}M parameters", flush=True)
    services = []
    try:
        common = ["--model", str(policy), "--device", "cpu"]
        services.append(start_service("trainer", [*common, "--weight-group-port", "0", "--weight-bucket-mb",
                                                  str(args.bucket_mb), "--max-message-mb", "64"], run_dir,
                                      timeout=600))
        trainer_address = services[0].address
        for label in ("generator", "generator-2"):
            services.append(start_service("generator", [*common, "--trainer-address", trainer_address], run_dir,
                                          timeout=600, label=label))
        token = dict(token_file=services[0].token_file, timeout=600)
        with TrainerClient(trainer_address, **token) as trainer, \
                GeneratorReplicas([GeneratorClient(g.address, **token) for g in services[1:]]) as replicas:
            results = measure(trainer, trainer_address, replicas, policy, args.rounds)
    finally:
        stop_services(services)
    results.update(parameters=parameters, layers=args.layers, bucket_mb=args.bucket_mb, rounds=args.rounds,
                   loadavg_start=started_load, loadavg_end=load_average(), cores=os.cpu_count())
    report(results)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(trainer: TrainerClient, trainer_address: str, replicas: GeneratorReplicas, policy: Path,
            rounds: int) -> dict:
    broadcast = BroadcastSync(trainer, trainer_address)
    times: dict[str, list[float]] = {"broadcast": [], "pull": [], "raw": []}
    state = load_file(str(policy / "model.safetensors"))  # the trainer's tensors, as it holds them
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    raw_path = str(WORK / "raw.safetensors")

    def raw() -> int:
        save_file(state, raw_path)
        return sum(t.numel() * t.element_size() for t in load_file(raw_path).values())

    phases: list[dict[str, float]] = []  # each timed broadcast's, from BroadcastSync

    def broadcast_once() -> int:
        reply = broadcast.sync(replicas.clients)
        phases.append(dict(reply.phase_seconds, coordinator_total=reply.seconds))
        return reply.bytes // len(replicas.clients)

    methods = {"broadcast": broadcast_once,
               "pull": lambda: replicas.load_weights(trainer_address).bytes // len(replicas.clients),
               "raw": raw}
    first = {}
    for name, method in methods.items():  # warm-up: opens the group, serializes the trainer's file once
        start = time.perf_counter()
        size = method()
        first[name] = time.perf_counter() - start
        print(f"warm-up {name}: {first[name]:.2f}s ({size / 1e9:.3f} GB)", flush=True)
    sizes = {}
    for round_index in range(rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            sizes[name] = method()
            times[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
              + f"  (load {load_average()})", flush=True)
    timed = phases[1:]  # the warm-up's first
    return {"bytes": sizes, "first_seconds": first, "seconds": times,
            "median_seconds": {n: statistics.median(t) for n, t in times.items()},
            "best_seconds": {n: min(t) for n, t in times.items()},
            "broadcast_phases": timed,
            "broadcast_phase_median_seconds": {k: statistics.median(p.get(k, 0.0) for p in timed)
                                               for k in sorted(timed[0])} if timed else {}}


def report(results: dict) -> None:
    model_bytes = results["bytes"]["raw"]
    median, best = results["median_seconds"], results["best_seconds"]
    gbps = {n: model_bytes / s / 1e9 for n, s in median.items()}
    results["effective_gbps"] = gbps
    results["ratios"] = {"broadcast_over_raw_seconds": median["broadcast"] / median["raw"],
                         "pull_over_broadcast_seconds": median["pull"] / median["broadcast"]}
    results["targets"] = {"broadcast_at_least_1_gbps": gbps["broadcast"] >= 1.0,
                          "broadcast_at_most_2x_raw": median["broadcast"] <= 2 * median["raw"]}
    print(f"\nweight sync of {model_bytes / 1e9:.3f} GB ({results['parameters'] / 1e6:.1f}M float32 parameters), "
          f"trainer -> 2 generators; {results['cores']} cores, load average {results['loadavg_start']} at the "
          f"start, {results['loadavg_end']} at the end")
    print(f"{'method':<10} {'seconds':>8} {'(best)':>8} {'GB/s each':>10} {'GB/s all':>9}")
    for name in ("broadcast", "pull", "raw"):
        copies = 1 if name == "raw" else 2
        print(f"{name:<10} {median[name]:8.3f} {best[name]:8.3f} {gbps[name]:10.2f} {gbps[name] * copies:9.2f}")
    r = results["ratios"]
    print(f"broadcast / raw save+load: {r['broadcast_over_raw_seconds']:.2f}x the time (target <= 2x: "
          f"{'met' if results['targets']['broadcast_at_most_2x_raw'] else 'NOT met'})")
    print(f"broadcast effective: {gbps['broadcast']:.2f} GB/s to each generator (target >= 1: "
          f"{'met' if results['targets']['broadcast_at_least_1_gbps'] else 'NOT met'})")
    print(f"pull / broadcast: {r['pull_over_broadcast_seconds']:.2f}x the time")
    phases = results.get("broadcast_phase_median_seconds", {})
    if phases:
        print("broadcast phases, median s (generator_*: the slower generator's; control: the coordinator's "
              "total beyond the slower side's):")
        for side in ("trainer", "generator"):
            print(f"  {side:<9} " + "  ".join(f"{k.removeprefix(side + '_')} {v:.3f}" for k, v in phases.items()
                                             if k.startswith(side + "_")))
        control = phases["coordinator_total"] - max(phases.get("trainer_total", 0.0), phases.get("generator_total", 0.0))
        print(f"  control   {control:.3f} (coordinator total {phases['coordinator_total']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
