"""Where the weight broadcast's time goes, and what bare gloo can do under it: variants side by side.

1 + R processes on 127.0.0.1 (rank 0 the trainer, R generators), a GPT-2-base-shaped policy
(12 x 768, vocab 21128: 102.1M float32 parameters, 0.408 GB; the tensors made here, no model
code), and in every round each variant once, in turn, so background load hits all alike:

  bare        torch only, no haoping code: the same bytes in ``--bucket-mb`` buckets, one
              pg.broadcast each, all in flight at once: the ceiling of gloo's own broadcast
  bare-2dev   bare over a group of two gloo devices: two sets of TCP connections, buckets
              alternating between them (two device threads per process)
  bare-split  torch only: each bucket cut in R parts, rank 0 sends part r to receiver r only and
              the receivers swap parts (pg.send/recv): rank 0 sends each byte once, not R times
  former      the weight broadcast as it was before spans (a copy of its loop over a WeightGroup):
              rank 0 packs every tensor into two reused bucket buffers, one packed while the
              other is on the wire; each receiver takes whole buckets into its own buffers,
              checks, and copies into its parameters
  direct-N    haoping.weight_broadcast.WeightGroup as it is, a tensor of N bytes or more (256k,
              32m) sent from its own storage in a span of its own, the rest packed in runs (into
              kept buffers) within each bucket, every span in flight at once and received
              straight into its place; the receiver checks and copies into its parameters
  adopt-N     direct-N, and the receiver receives into ReceiveBuffers and makes the received
              views its parameters (no copy): the generator's path

Figures: the median wall seconds from a barrier to the last receiver done, GB/s to each
receiver, the CPU seconds of every process summed (about cores x wall: CPU-bound), and for the
haoping variants each side's phases. Plus one memcpy of the bytes in one process, for scale.

    make bench-weight-broadcast-ab   (python -m bench.weight_broadcast_ab [--receivers 2] [--rounds 7]
                                     [--variants bare,former,adopt-256k,...])
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

VARIANTS = ("bare", "bare-2dev", "bare-split", "former", "direct-256k", "adopt-256k", "direct-32m", "adopt-32m")
TIMEOUT = timedelta(seconds=120)


def gpt2_base_shapes(layers: int = 12, width: int = 768, vocab: int = 21128, positions: int = 1024) -> dict:
    """GPT2LMHeadModel's named_parameters() shapes (the LM head tied to wte)."""
    shapes = {"transformer.wte.weight": (vocab, width), "transformer.wpe.weight": (positions, width)}
    for i in range(layers):
        block = f"transformer.h.{i}."
        shapes.update({block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                       block + "attn.c_attn.weight": (width, 3 * width), block + "attn.c_attn.bias": (3 * width,),
                       block + "attn.c_proj.weight": (width, width), block + "attn.c_proj.bias": (width,),
                       block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                       block + "mlp.c_fc.weight": (width, 4 * width), block + "mlp.c_fc.bias": (4 * width,),
                       block + "mlp.c_proj.weight": (4 * width, width), block + "mlp.c_proj.bias": (width,)})
    shapes.update({"transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,)})
    return shapes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bare_group(store, rank: int, world: int, devices: int = 1):
    from torch.distributed import PrefixStore
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = TIMEOUT
    options._threads = 4
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1") for _ in range(devices)]
    return ProcessGroupGloo(PrefixStore(f"bare-{devices}", store), rank, world, options)


def bare_broadcast(pg, buckets) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    works = [pg.broadcast([b], options) for b in buckets]
    for work in works:
        work.wait()


def bare_split(pg, buckets, rank: int, world: int) -> None:
    parts = [bucket.tensor_split(world - 1) for bucket in buckets]
    if rank == 0:
        works = [pg.send([p[r - 1]], r, index) for index, p in enumerate(parts) for r in range(1, world)]
    else:
        from_root = [pg.recv([p[rank - 1]], 0, index) for index, p in enumerate(parts)]
        works = []
        for index, p in enumerate(parts):  # a part forwarded as soon as it came
            from_root[index].wait()
            for peer in range(1, world):
                if peer != rank:
                    works.append(pg.send([p[rank - 1]], peer, index))
                    works.append(pg.recv([p[peer - 1]], peer, index))
    for work in works:
        work.wait()


def former_broadcast(group, version: int, tensors: dict, bucket_bytes: int, spare: list) -> dict:
    """The sender before spans: every tensor packed into one of two reused bucket buffers."""
    import torch

    from haoping.weight_broadcast import Header, Phases, STATUS_OK, plan_header

    phases = Phases()
    with phases("header"):
        planned = plan_header(version, tensors, bucket_bytes)
        header = Header(planned.version, planned.buckets, planned.tensors)  # no spans: whole buckets
        group._send_header(header)
    by_bucket = [[] for _ in header.buckets]
    for slot in header.tensors:
        by_bucket[slot.bucket].append(slot)
    in_flight = []
    with phases("transfer"):  # packing included: it overlaps the previous bucket's sending
        for index, nbytes in enumerate(header.buckets):
            fits = [i for i, b in enumerate(spare) if b.numel() >= nbytes]
            buffer = spare.pop(fits[0]) if fits else torch.empty(max(nbytes, 1), dtype=torch.uint8)
            view = buffer[:nbytes]
            for slot in by_bucket[index]:
                view[slot.offset:slot.offset + slot.nbytes].copy_(tensors[slot.name].reshape(-1).view(torch.uint8))
            in_flight.append((group._bcast(view), buffer))
            if len(in_flight) == 2:
                done, done_buffer = in_flight.pop(0)
                done.wait()
                spare.append(done_buffer)
        for work, buffer in in_flight:
            work.wait()
            spare.append(buffer)
    with phases("status"):
        group._statuses(STATUS_OK)
    return dict(phases)


def former_receive(group, check, buffers: list) -> tuple[int, dict, dict]:
    """The receiver before spans: whole buckets into its own reused buffers, then the check."""
    import torch

    from haoping.weight_broadcast import Phases, STATUS_OK, unpack

    phases = Phases()
    with phases("header"):
        header = group._receive_header()
    with phases("transfer"):
        if [b.numel() for b in buffers] != list(header.buckets):
            buffers[:] = [torch.empty(n, dtype=torch.uint8) for n in header.buckets]
        works = [group._bcast(buffer) for buffer in buffers]
        for work in works:
            work.wait()
    with phases("check"):
        tensors = unpack(header, buffers)
        check(tensors, header.version)
    with phases("status"):
        group._statuses(STATUS_OK)
    return header.version, tensors, phases


def barrier(pg) -> None:
    import torch

    pg.allreduce([torch.zeros(1)]).wait()


def rank_main(rank: int, world: int, port: int, config: dict, results) -> None:
    import torch
    from torch.distributed import TCPStore

    from haoping.generation import check_weights
    from haoping.weight_broadcast import ReceiveBuffers, WeightGroup

    torch.set_num_threads(1)
    store = TCPStore("127.0.0.1", port, world, rank == 0, timeout=TIMEOUT)
    pg = bare_group(store, rank, world)
    pg2 = bare_group(store, rank, world, devices=2)
    group = WeightGroup(store, "ab", rank, world, "127.0.0.1", TIMEOUT.total_seconds())
    shapes = gpt2_base_shapes()
    generator = torch.Generator().manual_seed(rank)
    # rank 0: the trainer's parameters; the others: their serving parameters
    params = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    total = sum(p.numel() * 4 for p in params.values())
    bare_bytes = torch.full((total,), 7 if rank == 0 else 0, dtype=torch.uint8)
    bare_buckets = list(bare_bytes.split(config["bucket_mb"] << 20))
    receive_buffers = ReceiveBuffers()
    former_buffers: list = []  # the former sender's two, or the former receiver's buckets
    bucket_bytes = config["bucket_mb"] << 20
    version = 0

    def run(variant: str) -> dict:
        nonlocal params, version
        if variant in ("bare", "bare-2dev"):
            bare_broadcast(pg if variant == "bare" else pg2, bare_buckets)
            return {}
        if variant == "bare-split":
            bare_split(pg, bare_buckets, rank, world)
            return {}
        if rank == 0:
            version += 1
            if variant == "former":
                return former_broadcast(group, version, params, bucket_bytes, former_buffers)
            direct_bytes = {"256k": 256 << 10, "32m": 32 << 20}[variant.split("-")[1]]
            return dict(group.broadcast(version, params, bucket_bytes, direct_bytes).phases)
        check = lambda state, v: check_weights(state, params, set(params), v, version)  # noqa: E731
        if variant == "former":
            got, state, phases = former_receive(group, check, former_buffers)
        else:
            adopt = variant.startswith("adopt")
            into = (lambda sizes: receive_buffers.spare(sizes, params.values())) if adopt else None
            got, state = group.receive(check, 1 << 31, into=into)
            phases = group.last_phases
        version = got
        started = time.perf_counter()
        if variant.startswith("adopt"):
            params = dict(state)  # the views become the parameters
        else:
            for name, tensor in state.items():
                params[name].copy_(tensor)
        phases["swap"] = time.perf_counter() - started
        return dict(phases)

    for round_index in range(config["rounds"] + 1):  # the first is a warm-up
        for variant in config["variants"]:
            if rank and variant.startswith("bare"):
                bare_bytes.zero_()
            barrier(pg)
            wall, cpu = time.perf_counter(), time.process_time()
            phases = run(variant)
            cpu = time.process_time() - cpu
            barrier(pg)
            wall = time.perf_counter() - wall
            if rank and variant.startswith("bare") and not bool((bare_bytes == 7).all()):
                raise SystemExit(f"rank {rank}: {variant} delivered wrong bytes")
            if round_index:
                results.put((rank, variant, wall, cpu, phases, os.getloadavg()[0]))
    barrier(pg)
    results.put((rank, "done", 0.0, 0.0, {}, 0.0))


def memcpy_seconds(nbytes: int, rounds: int) -> float:
    import torch

    torch.set_num_threads(1)
    source = torch.full((nbytes,), 7, dtype=torch.uint8)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.weight_broadcast_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    config = dict(bucket_mb=args.bucket_mb, rounds=args.rounds, variants=variants)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    world, port = args.receivers + 1, free_port()
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=rank_main, args=(rank, world, port, config, results), daemon=True)
                 for rank in range(world)]
    for process in processes:
        process.start()
    rows: dict[str, dict[int, list]] = {}
    done = 0
    try:
        while done < world:
            rank, variant, wall, cpu, phases, load = results.get(timeout=900)
            if variant == "done":
                done += 1
                continue
            rows.setdefault(variant, {}).setdefault(rank, []).append((wall, cpu, phases, load))
    finally:
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()
    nbytes = sum(4 * _numel(s) for s in gpt2_base_shapes().values())
    copy = memcpy_seconds(nbytes, args.rounds)
    gigabytes = nbytes / 1e9
    summary = {"receivers": args.receivers, "bucket_mb": args.bucket_mb, "rounds": args.rounds,
               "gigabytes": gigabytes, "cores": os.cpu_count(), "loadavg_start": load_start,
               "memcpy_seconds": copy, "variants": {}}
    print(f"{gigabytes:.3f} GB from rank 0 to {args.receivers} receiver(s) on 127.0.0.1, {args.bucket_mb} MiB "
          f"buckets, {args.rounds} rounds; {os.cpu_count()} cores")
    print(f"{'variant':<11} {'wall s':>7} {'GB/s each':>10} {'CPU s all':>10}  phases (median s; receivers: the slower)")
    for variant in variants:
        by_rank = rows[variant]
        walls = [w for w, _, _, _ in by_rank[0]]  # rank 0's barrier to barrier: the slowest receiver included
        wall = statistics.median(walls)
        cpu = sum(statistics.median(c for _, c, _, _ in runs) for runs in by_rank.values())
        sender = _median_phases([p for _, _, p, _ in by_rank[0]])
        receiver = _max_phases([_median_phases([p for _, _, p, _ in by_rank[r]]) for r in by_rank if r])
        summary["variants"][variant] = {"median_seconds": wall, "walls": walls, "gbps_each": gigabytes / wall,
                                        "cpu_seconds_all_ranks": cpu, "sender_phases": sender,
                                        "receiver_phases": receiver}
        text = ""
        if sender:
            text = ("trainer " + " ".join(f"{k} {v:.3f}" for k, v in sender.items()) + " | generator "
                    + " ".join(f"{k} {v:.3f}" for k, v in receiver.items()))
        print(f"{variant:<11} {wall:7.3f} {gigabytes / wall:10.2f} {cpu:10.2f}  {text}")
    print(f"{'memcpy':<11} {copy:7.3f} {gigabytes / copy:10.2f}  (one copy of the bytes in one process)")
    summary["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load_start} at the start, {summary['loadavg_end']} at the end")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0


def _numel(shape: tuple) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _median_phases(runs: list[dict]) -> dict:
    keys = sorted({k for run in runs for k in run})
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}


def _max_phases(sides: list[dict]) -> dict:
    keys = sorted({k for side in sides for k in side})
    return {k: max(side.get(k, 0.0) for side in sides) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
