"""`make bench-distributed`: the data-parallel trainer's Step time, 1 process vs 2 (gloo) with
whole copies vs 2 with FSDP2 shards (``--fsdp``), on the same rollouts and the same machine,
side by side. A figure for the record, not a target: on a
2-core CPU host the two processes share the cores one process would use, and add the gradient
all-reduce, so no speedup is expected; on GPUs each process has its own device.

Both sides start from the starter policy with the same seed and take the same Steps (4 prompts x
16 samples = 64 rollouts, 12-token queries, 16-token responses, random scores; the default
algorithm, GRPO), one warm-up Step and ``--steps`` timed ones. One process gets ``--threads``
torch threads; each of the two processes ``--threads`` / 2, so both use the same cores. Also
checked: the two runs' statistics agree (max abs difference), beside the difference float32
rounding alone makes (one process at half the threads). Writes bench/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULTS = Path("bench/distributed.json")


def rollouts(vocab_size: int, prompts: int, samples: int, query_tokens: int, response_tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries, responses = [], []
    for _ in range(prompts):
        query = torch.randint(1000, vocab_size, (query_tokens,), generator=generator).tolist()
        for _ in range(samples):
            queries.append(query)
            responses.append(torch.randint(1000, vocab_size, (response_tokens,), generator=generator).tolist())
    scores = torch.rand(len(queries), generator=generator).tolist()
    return queries, responses, scores


def _run(rank: int, world: int, port: int, args: dict, out: str) -> None:
    """One side: ``world`` processes (1: no torch.distributed at all) taking the same Steps."""
    from haoping.distributed import DataParallel
    from haoping.ppo_trainer import PPOConfig, PPOTrainer

    torch.set_num_threads(args.get("threads_per_process") or max(1, args["threads"] // world))
    parallel = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        parallel = DataParallel.from_env("gloo", torch.device("cpu"), timeout_seconds=600)
    try:
        trainer = PPOTrainer(args["model"], PPOConfig.from_dict({"algorithm": args["algorithm"]}),
                             parallel=parallel, fsdp=args.get("fsdp", False))
        batch = rollouts(trainer.model.lm.config.vocab_size, args["prompts"], args["samples"], args["query_tokens"],
                         args["response_tokens"])
        seconds, stats = [], []
        for _ in range(1 + args["steps"]):
            started = time.perf_counter()
            stats.append(trainer.step(*batch))
            seconds.append(time.perf_counter() - started)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds[1:], "warmup_seconds": seconds[0],
                                             "stats": stats}))
    finally:
        if parallel is not None:
            parallel.close()


def measure(world: int, args: argparse.Namespace, threads_per_process: int = 0, fsdp: bool = False) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        settings = {**vars(args), "threads_per_process": threads_per_process, "fsdp": fsdp}
        mp.spawn(_run, args=(world, port, settings, str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="starter:policy")
    parser.add_argument("--algorithm", default="grpo")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--query-tokens", type=int, default=12)
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed Steps per side, after one warm-up Step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per side")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    one, two, two_fsdp = measure(1, args), measure(2, args), measure(2, args, fsdp=True)
    # the scale of float32 rounding alone: one process again, with another thread count
    one_other_threads = measure(1, args, threads_per_process=max(1, args.threads // 2))
    stat_keys = [k for k in one["stats"][0] if not k.startswith("time/")]

    def max_difference_to(other: dict) -> float:
        return max(abs(a[k] - b[k]) for a, b in zip(one["stats"], other["stats"]) for k in stat_keys)

    max_difference, rounding_difference = max_difference_to(two), max_difference_to(one_other_threads)
    fsdp_difference = max_difference_to(two_fsdp)
    one_s, two_s = statistics.median(one["seconds"]), statistics.median(two["seconds"])
    fsdp_s = statistics.median(two_fsdp["seconds"])
    result = {
        "figures": {"step_seconds_1_process": one_s, "step_seconds_2_processes": two_s,
                    "step_time_ratio_2_vs_1": two_s / one_s, "stats_max_abs_difference": max_difference,
                    "step_seconds_2_fsdp_processes": fsdp_s, "step_time_ratio_2_fsdp_vs_1": fsdp_s / one_s,
                    "stats_max_abs_difference_fsdp": fsdp_difference,
                    "stats_max_abs_difference_1_process_other_threads": rounding_difference},
        "one_process": one, "two_processes": two, "two_fsdp_processes": two_fsdp,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()[0]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"Step on {args.prompts * args.samples} rollouts ({args.model}, {args.algorithm}), median of "
          f"{args.steps}: 1 process {one_s:.2f} s, 2 processes {two_s:.2f} s, ratio {two_s / one_s:.2f}, "
          f"2 FSDP processes {fsdp_s:.2f} s, ratio {fsdp_s / one_s:.2f} (no target); statistics differ by at most "
          f"{max_difference:.1e}, FSDP {fsdp_difference:.1e} (1 process at {max(1, args.threads // 2)} "
          f"threads vs {args.threads}: {rounding_difference:.1e}); load average "
          f"{load_start:.2f} -> {result['machine']['loadavg_at_end']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
