"""`make bench`: every serving figure in one run, both sides of every ratio measured here.

The same PPO cycle (rollout -> score -> update -> weight sync) on the starter models, with the
coordinator's default settings (4 prompts x 16 samples = 64, 16 new tokens, seed 0), three ways:

  services    the gRPC services, driven by Coordinator.cycle exactly as `haoping run` does
  in-process  the same library classes called directly, no gRPC           (bench/inprocess.py)
  reference   the reference design's algorithm in-process: one-by-one generate and scoring,
              PPO minibatches of 1                                          (bench/reference.py)

Figures (ratio = ours / baseline; for grpc_cycle_overhead, lower is better):
  rollout_speedup      rollout samples/s in the services' cycles vs the reference's cycles
  ppo_update_speedup   one PPO step on the same 64 samples: the coordinator's default minibatches
                       (PPOConfig.minibatch_size) vs minibatches of 1, 4 epochs each
  cycle_speedup        PPO samples/s through the services vs the reference in-process
  grpc_cycle_overhead  cycle seconds through the services vs in-process
  weight_sync          trainer -> generator pull (GB/s), as `haoping run` makes it: the file handed over in
                       the run's folder (--local-weights-dir), vs a raw safetensors save + load
  score_speedup        Score of 256 texts vs an HF pipeline called one text at a time
  dynamic_batching     32 concurrent 1-prompt clients vs the same 32 requests serially, 16 new
                       tokens each (dynamic_batching_eos: allowed to end at EOS, no target)
  peak_rss/<service>   VmHWM of each service process
plus a scaling table: cycle time at batch 16, 64 and 256 with 1 and 2 generator replicas, and
a breakdown of the rollout, the score and the update: seconds inside model forward/backward
calls vs everything else (bench/breakdown.py), each figure printed with its phase's share.
Writes bench/results.json: figures (each with the load average before and after it), the
breakdown, scaling, every timed cycle, checks and the machine (CPU model, flags, cores, load).
`make bench-real-size` (bench/real_size.py) measures at a real Chinese GPT-2's size.

`python -m bench.serving --only dynamic_batching` (or weight_sync, score_speedup) measures just
those figures against freshly started services and prints them; results.json is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.breakdown import clock_cost_seconds, phase_breakdown
from bench.inprocess import InProcessPipeline
from bench.reference import ReferencePipeline
from haoping.bootstrap import ensure_starter_models
from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, TrainerClient
from haoping.log import setup_logging
from haoping.models import use_deterministic_kernels
from services.coordinator.run import Coordinator, add_run_flags, split_services, start_services, stop_services

RESULTS = Path("bench/results.json")
WORK = Path("bench/run")
SEED = 0
# Timed cycles after one warm-up each; figures take the median. The reference's cycles cost ~8x
# more, so it runs fewer; services and in-process run more, as their ratio is the finest one.
# On a shared 2-core machine single cycles swing by 10-15%: more cycles steady the medians.
TIMED_CYCLES = {"services": 12, "in_process": 12, "reference": 5}
SCALING_BATCHES = (16, 64, 256)
SCALING_REPLICAS = (1, 2)
SCALING_TIMED_CYCLES = 3


@dataclass
class Figure:
    ours: float
    baseline: float | None
    unit: str
    target: float | None = None
    lower_is_better: bool = False
    ratio: float | None = None
    met: bool | None = None
    loadavg_before: list[float] | None = None  # 1, 5, 15 min, around this figure's measurement
    loadavg_after: list[float] | None = None

    def __post_init__(self):
        if self.baseline:
            self.ratio = self.ours / self.baseline
        if self.target is not None and self.ratio is not None:
            self.met = self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target


@dataclass
class Stack:
    """The running services and clients for them."""
    args: argparse.Namespace
    trainer_address: str
    generator_addresses: list[str]
    scorer: ScorerClient
    trainer: TrainerClient
    token_file: Path | None = None  # the services' token

    def replicas(self, count: int) -> GeneratorReplicas:
        return GeneratorReplicas([GeneratorClient(a, token_file=self.token_file)
                                  for a in self.generator_addresses[:count]])

    def coordinator(self, generator: GeneratorReplicas, **overrides) -> Coordinator:
        """A coordinator with the default run flags, or with ``overrides``."""
        return Coordinator(run_args(**overrides) if overrides else self.args, generator, self.scorer, self.trainer,
                           self.trainer_address, WORK)


def timed(fn, repeat: int = 1) -> float:
    """Best of ``repeat`` wall-clock runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_args(**overrides) -> argparse.Namespace:
    """The coordinator's own flags and defaults, as `haoping run` would parse them."""
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--device", "cpu", "--seed", str(SEED)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def cycle_summary(records: list[dict]) -> dict:
    """Median seconds of each phase over timed cycles."""
    keys = ("seconds", "time/rollout", "time/score", "time/update", "time/weight_sync")
    return {"samples": records[0]["samples"], **{k: statistics.median(r[k] for r in records) for k in keys}}


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo (None where there is none)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.split(":", 1)[0].strip() == name)
    except (OSError, StopIteration):
        return None


def machine_info() -> dict:
    flags = cpuinfo_field("flags")
    return {"cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "cpu_flags": flags.split() if flags else [], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}


@contextmanager
def load_recorded(into: dict):
    """Sets ``loadavg_before``/``loadavg_after`` on every Figure that ``into`` holds at the end
    and did not have before: each figure carries the load it was measured under."""
    before, known = list(os.getloadavg()), set(into)
    yield
    after = list(os.getloadavg())
    for name, figure in into.items():
        if name not in known and isinstance(figure, Figure):
            figure.loadavg_before, figure.loadavg_after = before, after


def model_breakdown(cycles: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """Per phase and pipeline, the median seconds, the seconds inside model forward/backward calls
    and their share. The services' own processes are not instrumented: their model seconds are
    the in-process pipeline's for the same cycles (the same library calls on the same samples:
    cycle 1's rollouts match exactly), so their rest is everything else: gRPC, handlers, batcher."""
    out: dict[str, dict[str, dict]] = {}
    for phase in ("rollout", "score", "update"):
        out[phase] = {}
        for name in ("services", "in_process", "reference"):
            timed = cycles[name][1:]
            model_of = cycles["in_process" if name == "services" else name][1:len(timed) + 1]
            seconds = statistics.median(r[f"time/{phase}"] for r in timed)
            model = {k: statistics.median(r["model"][phase][k] for r in model_of)
                     for k in ("forward", "backward", "calls")}
            out[phase][name] = phase_breakdown(seconds, model)
    return out


# ---------------------------------------------------------------- measurements

def measure_cycles(stack: Stack, in_process: InProcessPipeline, reference: ReferencePipeline) -> tuple[dict[str, list[dict]], dict[str, Figure]]:
    """The same cycles three ways, interleaved so background load hits all alike. All three start
    from the starter policy. Records are [warm-up cycle 0, timed cycles ...]."""
    with stack.replicas(1) as generator:
        runners = {"services": stack.coordinator(generator).cycle, "in_process": in_process.cycle,
                   "reference": reference.cycle}
        cycles: dict[str, list[dict]] = {name: [] for name in runners}
        for index in range(1 + max(TIMED_CYCLES.values())):
            print(f"cycle {index} ...", flush=True)
            for name, run_cycle in runners.items():
                if index <= TIMED_CYCLES[name]:
                    cycles[name].append(run_cycle(index))
    ours, in_proc, ref = (cycle_summary(cycles[name][1:]) for name in ("services", "in_process", "reference"))
    figures = {
        "rollout_speedup": Figure(ours["samples"] / ours["time/rollout"], ref["samples"] / ref["time/rollout"],
                                  "samples/s", 15),
        "cycle_speedup": Figure(ours["samples"] / ours["seconds"], ref["samples"] / ref["seconds"], "samples/s", 8),
        "grpc_cycle_overhead": Figure(ours["seconds"], in_proc["seconds"], "s/cycle", 1.05, lower_is_better=True),
    }
    return cycles, figures


def measure_update(in_process: InProcessPipeline, reference: ReferencePipeline) -> Figure:
    """One PPO step on the same samples: the default minibatches vs minibatches of 1."""
    print(f"PPO update: minibatch {in_process.trainer.config.minibatch_size} vs 1 ...", flush=True)
    batch = in_process.last_batch
    vectorized = one_by_one = float("inf")
    for _ in range(3):  # interleaved, best of three each
        vectorized = min(vectorized, timed(lambda: in_process.step(*batch)))
        one_by_one = min(one_by_one, timed(lambda: reference.trainer.step(*batch)))
    return Figure(len(batch[0]) / vectorized, len(batch[0]) / one_by_one, "samples/s", 5)


def measure_weight_sync(stack: Stack, state: dict[str, torch.Tensor], repeat: int = 5) -> Figure:
    """A generator's LoadWeights from the trainer, the file handover of co-located services (the
    first, untimed pull writes the version's file, as the first generator of a cycle does), vs a raw
    safetensors save + load of the same tensors (``state``: the policy's, as the trainer sends them).
    The gRPC stream between hosts is measured by bench/weight_sync.py."""
    with stack.replicas(1) as generator:
        size = generator.load_weights(stack.trainer_address).bytes
        sync = timed(lambda: generator.load_weights(stack.trainer_address), repeat=repeat)
    path = str(WORK / "weights.safetensors")
    raw = timed(lambda: (save_file(state, path), load_file(path)), repeat=repeat)
    return Figure(size / sync / 1e9, size / raw / 1e9, "GB/s", 0.8)


def measure_score(stack: Stack, reference: ReferencePipeline) -> Figure:
    """One batched Score request vs the HF pipeline called one text at a time, on 256 texts."""
    with stack.replicas(1) as generator:
        texts = [s.full_text for s in generator.generate(stack.args.prompts, n=64, max_new_tokens=16,
                                                         seed=2).samples]
    stack.scorer.score(texts[:8])
    batched = timed(lambda: stack.scorer.score(texts), repeat=3)
    one_by_one = timed(lambda: [reference.score_one(t) for t in texts], repeat=2)
    return Figure(len(texts) / batched, len(texts) / one_by_one, "texts/s", 6)


def measure_dynamic_batching(stack: Stack, rounds: int = 3, with_eos: bool = True) -> dict[str, Figure]:
    """32 clients with one prompt each, at once (merged by the batcher) vs one after another.

    ``dynamic_batching``: every request asks for exactly 16 new tokens (min_new_tokens=16), the
    same work on both sides, as throughput benchmarks fix output lengths (vLLM's ignore_eos).
    ``dynamic_batching_eos``: the same requests allowed to end at EOS (no target). The serial
    side then gains from every sample the policy of the moment ends early, while a one-shot
    burst still runs to its longest sample; so it moves with how far training has come.

    The 32 client threads exist before the clock starts (a client pool is not server work), and
    one untimed round of each side warms up the server's handler threads; then the two sides
    alternate, best of ``rounds`` each."""
    prompts = stack.args.prompts
    with stack.replicas(1) as generator, ThreadPoolExecutor(32) as clients:
        gen = generator.clients[0]

        def figure(min_new_tokens: int, target: float | None) -> Figure:
            def one(i: int):
                return gen.generate([prompts[i % 4]], max_new_tokens=16, min_new_tokens=min_new_tokens, seed=i)

            def concurrent():
                list(clients.map(one, range(32)))

            def serial():
                for i in range(32):
                    one(i)

            concurrent(), serial()
            best_concurrent = best_serial = float("inf")
            for _ in range(rounds):
                best_concurrent = min(best_concurrent, timed(concurrent))
                best_serial = min(best_serial, timed(serial))
            return Figure(32 / best_concurrent, 32 / best_serial, "requests/s", target)

        figures = {"dynamic_batching": figure(16, 10)}
        if with_eos:
            figures["dynamic_batching_eos"] = figure(0, 8)
        return figures


def measure_scaling(stack: Stack) -> tuple[list[dict], bool]:
    """Cycle time by batch size and generator replicas (configurations interleaved), and whether
    1 and 2 replicas give the same samples for the same request."""
    rows, index = [], 100  # fresh seeds, away from the cycles above
    with ExitStack() as open_pools:
        pools = {count: open_pools.enter_context(stack.replicas(count)) for count in SCALING_REPLICAS}
        every_replica = pools[max(SCALING_REPLICAS)]
        for batch in SCALING_BATCHES:
            print(f"scaling: batch {batch}, {SCALING_REPLICAS} generator replicas ...", flush=True)
            per_prompt = batch // len(stack.args.prompts)
            coordinators = {count: stack.coordinator(pool, generator_replicas=count, samples_per_prompt=per_prompt)
                            for count, pool in pools.items()}
            timed_cycles: dict[int, list[dict]] = {count: [] for count in pools}
            for k in range(1 + SCALING_TIMED_CYCLES):
                for count, coordinator in coordinators.items():
                    every_replica.load_weights(stack.trainer_address)  # no replica left at an old version
                    record = coordinator.cycle(index)
                    index += 1
                    if k:  # the first round warms up
                        timed_cycles[count].append(record)
            for count, records in timed_cycles.items():
                row = cycle_summary(records)
                rows.append({"batch": batch, "generator_replicas": count, **row,
                             "samples_per_second": row["samples"] / row["seconds"]})
        a = stack.args
        outputs = [[list(s.response_token_ids) for s in pool.generate(
            a.prompts, n=a.samples_per_prompt, seed=7, max_new_tokens=a.max_new_tokens,
            min_new_tokens=a.min_new_tokens).samples] for pool in pools.values()]
    return rows, all(o == outputs[0] for o in outputs)


# ---------------------------------------------------------------- the run

QUICK_FIGURES = ("weight_sync", "score_speedup", "dynamic_batching")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=QUICK_FIGURES, metavar="FIGURE",
                        help=f"measure only these figures ({', '.join(QUICK_FIGURES)}) with one generator "
                             "and print them, without the cycles or the scaling table; bench/results.json "
                             "is not written")
    return parser.parse_args(argv)


@contextmanager
def started_stack(args: argparse.Namespace, stack_args: argparse.Namespace | None = None):
    """Start the services ``args`` describe; yield (a Stack over them built with ``stack_args``,
    default ``args``; the service processes); stop the services afterwards, whatever happened."""
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    services = []
    try:
        start_services(args, WORK, services)
        trainer_svc, generator_svcs, scorer_svc = split_services(services)
        token = dict(token_file=trainer_svc.token_file)
        with ScorerClient(scorer_svc.address, **token) as scorer, TrainerClient(trainer_svc.address, **token) as trainer:
            yield (Stack(stack_args or args, trainer_svc.address, [g.address for g in generator_svcs], scorer, trainer,
                         trainer_svc.token_file), services)
    finally:
        stop_services(services)


def measure_only(names: list[str]) -> int:
    """The figures measured outside the cycles, alone: a quick check of one of them."""
    args = run_args()
    figures: dict[str, Figure] = {}
    print("starting the services ...", flush=True)
    with started_stack(args) as (stack, _services):
        for name in QUICK_FIGURES:
            if name not in names:
                continue
            print(f"{name} ...", flush=True)
            if name == "weight_sync":
                figures[name] = measure_weight_sync(stack, InProcessPipeline(args).trainer.policy_state())
            elif name == "score_speedup":
                figures[name] = measure_score(stack, ReferencePipeline(args))
            else:
                figures.update(measure_dynamic_batching(stack))
    print()
    print_figures(figures)
    print(f"machine: {machine_info()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.perf_counter()
    setup_logging(os.environ.get("HAOPING_LOG_LEVEL", "WARNING"))
    torch.manual_seed(SEED)
    # the kernels every service runs (--deterministic): both sides of services-vs-in-process run the
    # same ones, and the in-process cycles equal the services' bit for bit
    use_deterministic_kernels()
    ensure_starter_models()
    if options.only:
        return measure_only(options.only)
    machine = machine_info()
    args = run_args(generator_replicas=max(SCALING_REPLICAS))
    figures: dict[str, Figure] = {}
    print("starting the services and the in-process pipelines ...", flush=True)
    with started_stack(args, stack_args=run_args()) as (stack, services):
        in_process, reference = InProcessPipeline(args), ReferencePipeline(args)
        with load_recorded(figures):
            cycles, cycle_figures = measure_cycles(stack, in_process, reference)
            figures.update(cycle_figures)
        with load_recorded(figures):
            figures["ppo_update_speedup"] = measure_update(in_process, reference)
        print("weight sync, score, dynamic batching ...", flush=True)
        with load_recorded(figures):
            figures["weight_sync"] = measure_weight_sync(stack, in_process.trainer.policy_state())
        with load_recorded(figures):
            figures["score_speedup"] = measure_score(stack, reference)
        with load_recorded(figures):
            figures.update(measure_dynamic_batching(stack))
        scaling, replicas_same_samples = measure_scaling(stack)
        for service in services:
            figures[f"peak_rss/{service.name}"] = Figure(peak_rss_mb(service.process.pid), None, "MB")

    wall = time.perf_counter() - started
    machine["loadavg_at_end"] = list(os.getloadavg())
    summary = {name: cycle_summary(records[1:]) for name, records in cycles.items()}  # [0] warmed up
    breakdown = model_breakdown(cycles)
    clock_cost = clock_cost_seconds()
    for phases in breakdown.values():  # the most the hooks can have added to a phase
        for row in phases.values():
            row["clock_cost_bound"] = row["calls"] * clock_cost
    same = [s["examples"] == i["examples"] and abs(s["reward_mean"] - i["reward_mean"]) < 1e-6
            for s, i in zip(cycles["services"], cycles["in_process"])]
    checks = {
        # Same starter weights, seeds and deterministic kernels: every cycle should match exactly
        # (without deterministic kernels they drifted apart after a few updates, at ~1e-8); how
        # many cycles agree from the first is reported.
        "services_and_in_process_same_first_rollout": same[0],
        "services_and_in_process_same_cycles": same.index(False) if False in same else len(same),
        "replicas_same_samples": replicas_same_samples,
    }
    RESULTS.write_text(json.dumps({
        "machine": machine, "wall_seconds": wall, "checks": checks,
        "figures": {name: asdict(f) for name, f in figures.items()},
        "model_breakdown": breakdown, "clock_cost_per_call_seconds": clock_cost,
        "scaling": scaling,
        "cycles": {name: {"median": summary[name],
                          "timed": [{k: v for k, v in r.items() if k != "examples"} for r in records[1:]]}
                   for name, records in cycles.items()},
    }, indent=2, ensure_ascii=False))
    print_report(figures, summary, scaling, machine, checks, wall, breakdown)
    return 0


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f} {unit}".strip()


# the phase whose model share is printed beside a figure: (phase, our pipeline, baseline pipeline)
FIGURE_PHASE = {"rollout_speedup": ("rollout", "services", "reference"),
                "ppo_update_speedup": ("update", "in_process", "reference"),
                "score_speedup": ("score", "services", "reference"),
                "grpc_cycle_overhead": ("rollout", "services", "in_process")}


def print_figures(figures: dict[str, Figure], breakdown: dict | None = None) -> None:
    print(f"{'figure':<22} {'ours':>18} {'baseline':>18} {'ratio':>7} {'target':>7}  met?  "
          f"model share ours/baseline (load 1-min before-after)")
    for name, f in figures.items():
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        target = "-" if f.target is None else f"{'<=' if f.lower_is_better else '>='}{f.target}x"
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        share = ""
        if breakdown and name in FIGURE_PHASE:
            phase, ours, base = FIGURE_PHASE[name]
            share = (f"{phase} {100 * breakdown[phase][ours]['model_share']:.0f}% / "
                     f"{100 * breakdown[phase][base]['model_share']:.0f}%")
        load = "" if f.loadavg_before is None else f" ({f.loadavg_before[0]:.2f}-{f.loadavg_after[0]:.2f})"
        print(f"{name:<22} {fmt(f.ours, f.unit):>18} {fmt(f.baseline, f.unit):>18} {ratio:>7} {target:>7}  "
              f"{met:<4}  {share}{load}")


def print_breakdown(breakdown: dict[str, dict[str, dict]]) -> None:
    print("\nmodel arithmetic     pipeline      phase s  forward  backward   rest s  model share")
    for phase, rows in breakdown.items():
        for name, b in rows.items():
            print(f"{phase:<20} {name:<12} {b['seconds']:8.3f} {b['forward']:8.3f} {b['backward']:9.3f} "
                  f"{b['rest']:8.3f}  {100 * b['model_share']:10.0f}%")
    print("(services: the in-process model seconds of the same cycles; the rest is gRPC, handlers, batcher)")


def print_report(figures: dict[str, Figure], summary: dict, scaling: list[dict], machine: dict, checks: dict,
                 wall: float, breakdown: dict | None = None) -> None:
    print()
    print_figures(figures, breakdown)
    if breakdown:
        print_breakdown(breakdown)
    print("\nmedian cycle (s)       total  rollout    score   update  weight sync")
    for name, s in summary.items():
        print(f"{name:<20} {s['seconds']:7.2f}  {s['time/rollout']:7.2f}  {s['time/score']:7.2f}  "
              f"{s['time/update']:7.2f}  {s['time/weight_sync']:7.3f}")
    print("\nscaling    replicas  cycle s  samples/s  rollout s  update s")
    for row in scaling:
        print(f"batch {row['batch']:<4} {row['generator_replicas']:>8}  {row['seconds']:7.2f}  "
              f"{row['samples_per_second']:9.1f}  {row['time/rollout']:9.2f}  {row['time/update']:8.2f}")
    print(f"\nchecks: {checks}")
    print(f"machine: {machine}")
    print(f"bench wall time {wall:.0f}s; wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
