"""`make bench-real-size`: the serving figures at the size of a real Chinese GPT-2.

The policy has the uer/gpt2-chinese-cluecorpussmall configuration (12 layers, 768 wide, 12
heads, 1024 positions, vocabulary 21,128: about 102M parameters) with random weights, built
from that configuration here (nothing is downloaded). Its tokenizer is the starter one with the
vocabulary filled up to 21,128 entries by CJK characters, as bert-base-chinese's is, so every
sampled id decodes to a character. The scorer is the starter classifier, the settings the
coordinator's defaults (4 prompts x 16 samples, 16 new tokens, at least 8).

Measured, against freshly started services (one generator):
  rollout_speedup     rollout samples/s in the services' cycles vs one HF generate per sample
  rollout_speedup_bf16_generator
                      the same rollout request to a generator serving in bfloat16 (the trainer stays
                      float32: `haoping run --generator-dtype bfloat16`); only on a CPU with bfloat16
                      instructions (avx512_bf16 or amx_bf16) or a GPU
  dynamic_batching    32 concurrent 1-prompt clients vs the same 32 serially, 16 new tokens each
  cycle seconds       by phase (rollout, score, update, weight sync), median of the timed cycles
  weight_sync         trainer -> generator pull (GB/s), by the shared folder as `haoping run` makes it,
                      vs a raw safetensors save + load
  peak_rss/<service>  VmHWM of each service process, and their sum (target: within 8 GB)
  model arithmetic    share of the rollout inside model forward calls, in-process vs one by one
At this size on a CPU the update is compute-bound on both sides, so it is timed, not compared.
Writes bench/results_real_size.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from bench.breakdown import ModelClock, phase_breakdown
from bench.inprocess import rollout_specs
from bench.reference import one_by_one_rollout
from bench.serving import (WORK, Figure, cycle_summary, fmt, load_recorded, machine_info, measure_dynamic_batching,
                           measure_weight_sync, peak_rss_mb, print_figures, run_args, started_stack, timed)
from haoping.bootstrap import ensure_starter_models
from haoping.generation import PolicyGenerator
from haoping.log import setup_logging
from haoping.client import GeneratorClient
from haoping.models import load_causal_lm, load_tokenizer, pick_device
from services.coordinator.run import start_service, stop_services

RESULTS = Path("bench/results_real_size.json")
POLICY_DIR = WORK / "real-size-policy"
# uer/gpt2-chinese-cluecorpussmall's config.json, the fields that set its size
REAL_SIZE = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=21128)
STACK_RSS_TARGET_MB = 8 * 1024


def build_real_size_policy(directory: Path | None = None, seed: int = 0) -> Path:
    """A random-weight GPT-2 of the real size, with a tokenizer whose vocabulary fills it."""
    directory = directory or POLICY_DIR
    if (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists():
        return directory
    starter = ensure_starter_models()
    tokenizer = load_tokenizer(str(starter["policy"]))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    ideographs = (chr(c) for c in range(0x4E00, 0x9FFF + 1))
    for char in ideographs:
        if len(vocab) >= REAL_SIZE["vocab_size"]:
            break
        vocab.setdefault(char, len(vocab))
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tokenizer = load_tokenizer(str(directory))
    assert len(tokenizer) == REAL_SIZE["vocab_size"], len(tokenizer)
    starter_config = json.loads((starter["policy"] / "config.json").read_text())
    config = GPT2Config(**REAL_SIZE, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, **{k: starter_config[k] for k in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")})
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def bfloat16_rollout_seconds(args: argparse.Namespace, trainer_address: str, rounds: int,
                             cpu_flags: list[str]) -> float | None:
    """A cycle's rollout request (the coordinator's) to a generator started with ``--dtype bfloat16``
    beside the float32 trainer (`haoping run --generator-dtype bfloat16`), after it pulled the
    trainer's weights: best of ``rounds`` seconds. None on a CPU without bfloat16 instructions
    (``cpu_flags``: the machine's), where it would be slower than float32."""
    if pick_device(args.device).type == "cpu" and not {"avx512_bf16", "amx_bf16"} & set(cpu_flags):
        return None
    run_dir = WORK / "bf16-generator"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    service = start_service("generator", ["--model", args.policy, "--device", args.device, "--dtype", "bfloat16",
                                          "--trainer-address", trainer_address], run_dir,
                            token_file=WORK / "auth-token")
    try:
        with GeneratorClient(service.address, token_file=WORK / "auth-token", timeout=600) as generator:
            generator.load_weights()
            request = dict(n=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0,
                           top_p=1.0, min_new_tokens=args.min_new_tokens)
            generator.generate(args.prompts, seed=0, **request)  # warm-up
            return timed(lambda: generator.generate(args.prompts, seed=1, **request), repeat=rounds)
    finally:
        stop_services([service])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2, help="timed cycles after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds for dynamic batching "
                                                                "and weight sync")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    setup_logging(os.environ.get("HAOPING_LOG_LEVEL", "WARNING"))
    machine = machine_info()
    print("building the real-size policy ...", flush=True)
    policy = str(build_real_size_policy())
    args = run_args(policy=policy)
    figures: dict[str, Figure] = {}
    print("starting the services ...", flush=True)
    with started_stack(args) as (stack, services):
        with stack.replicas(1) as generator:
            coordinator = stack.coordinator(generator)
            records = []
            with load_recorded(figures):
                for index in range(1 + options.cycles):
                    print(f"cycle {index} ...", flush=True)
                    records.append(coordinator.cycle(index))
                cycle = cycle_summary(records[1:])
                print("one-by-one rollout ...", flush=True)
                lm = load_causal_lm(policy, torch.device("cpu"), torch.float32)
                reference_clock = ModelClock().watch(lm)
                tokenizer = load_tokenizer(policy)
                one_by_one_rollout(lm, tokenizer, args, 0, 1)  # warm-up, 4 samples
                reference_clock.read()
                start = time.perf_counter()
                one_by_one_rollout(lm, tokenizer, args, 1, args.samples_per_prompt)
                reference_seconds = time.perf_counter() - start
                reference_breakdown = phase_breakdown(reference_seconds, reference_clock.read())
                reference_clock.remove()
                samples = args.samples_per_prompt * len(args.prompts)
                figures["rollout_speedup"] = Figure(cycle["samples"] / cycle["time/rollout"],
                                                    samples / reference_seconds, "samples/s", 15)
        print("in-process rollout ...", flush=True)
        in_process = PolicyGenerator(policy)
        clock = ModelClock().watch(in_process.model)
        in_process.generate(rollout_specs(in_process, args, 0, 1))  # warm-up
        clock.read()
        start = time.perf_counter()
        in_process.generate(rollout_specs(in_process, args, 1, args.samples_per_prompt))
        in_process_breakdown = phase_breakdown(time.perf_counter() - start, clock.read())
        del in_process, lm
        print("bfloat16 generator rollout ...", flush=True)
        with load_recorded(figures):
            bf16 = bfloat16_rollout_seconds(args, stack.trainer_address, options.rounds, machine["cpu_flags"])
        if bf16 is not None:
            figures["rollout_speedup_bf16_generator"] = Figure(samples / bf16, samples / reference_seconds,
                                                               "samples/s", 15)
        print("dynamic batching, weight sync ...", flush=True)
        with load_recorded(figures):
            figures.update(measure_dynamic_batching(stack, rounds=options.rounds, with_eos=False))
        with load_recorded(figures):
            figures["weight_sync"] = measure_weight_sync(stack, load_file(Path(policy) / "model.safetensors"),
                                                         repeat=options.rounds)
        rss = {service.name: peak_rss_mb(service.process.pid) for service in services}
        for name, mb in rss.items():
            figures[f"peak_rss/{name}"] = Figure(mb, None, "MB")
        figures["peak_rss/stack"] = Figure(sum(rss.values()), STACK_RSS_TARGET_MB, "MB", 1.0, lower_is_better=True)
    machine["loadavg_at_end"] = list(os.getloadavg())
    parameters = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(**REAL_SIZE)).parameters())
    rollout_breakdown = {"services": phase_breakdown(cycle["time/rollout"], {
        "forward": in_process_breakdown["forward"], "backward": 0.0, "calls": in_process_breakdown["calls"]}),
        "in_process": in_process_breakdown, "reference": reference_breakdown}
    wall = time.perf_counter() - started
    RESULTS.write_text(json.dumps({
        "machine": machine, "wall_seconds": wall, "policy_config": REAL_SIZE, "policy_parameters": parameters,
        "figures": {name: vars(f) for name, f in figures.items()},
        "cycle_median": cycle, "cycles": [{k: v for k, v in r.items() if k != "examples"} for r in records[1:]],
        "rollout_model_breakdown": rollout_breakdown,
    }, indent=2, ensure_ascii=False))
    print()
    print(f"policy: GPT-2 {REAL_SIZE}, {parameters / 1e6:.1f}M parameters, random weights")
    print_figures(figures)
    print("\nmedian cycle (s)      total  rollout    score   update  weight sync")
    print(f"services           {cycle['seconds']:7.2f}  {cycle['time/rollout']:7.2f}  {cycle['time/score']:7.2f}  "
          f"{cycle['time/update']:7.2f}  {cycle['time/weight_sync']:7.3f}")
    print("\nrollout              seconds  in model forward  model share")
    for name, b in rollout_breakdown.items():
        print(f"{name:<20} {fmt(b['seconds']):>7} {fmt(b['model']):>17} {100 * b['model_share']:11.0f}%")
    print("(services: the in-process rollout's model seconds for the same amount of work)")
    print(f"machine: {machine}")
    print(f"bench wall time {wall:.0f}s; wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
