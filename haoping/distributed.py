"""Data parallelism for the trainer over torch.distributed (gloo on CPU, NCCL on CUDA).

Every process (rank) holds the whole model and the whole batch of rollouts; rank 0 serves gRPC
and sends each state-changing call to the others (:class:`LeaderCalls`, :func:`follow_leader`).
Inside a Step each rank runs the rollout forward on its shard of the rows (gathered back), and
the backward on its share of every minibatch; the gradients are summed over ranks. Loss weights
divide by the minibatch's GLOBAL token count, so N processes take the update one would.
With ``--fsdp`` (:func:`fully_shard_model`) each rank holds only its shard of the parameters,
gradients and optimizer state (FSDP2), and the gradients are summed by FSDP's reduce-scatter.

Nothing here runs in a single process: :class:`haoping.ppo_trainer.PPOTrainer` without a
:class:`DataParallel` never touches torch.distributed.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from haoping.log import get_logger

log = get_logger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
GRAD_BUCKET_ELEMENTS = 1 << 24  # 64 MB of float32 per all-reduce: bounded extra memory


class ProcessGroupFailed(RuntimeError):
    """A collective failed (another process died or hung past the timeout): this process group
    cannot take part in any further update."""


def collective(method):
    """Turn the failure of a collective (gloo raises a plain RuntimeError for a lost peer, NCCL a
    DistError) into :class:`ProcessGroupFailed`."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ProcessGroupFailed:
            raise
        except RuntimeError as err:
            raise ProcessGroupFailed(f"{method.__name__}: {str(err).splitlines()[0] if str(err) else err!r}") from err
    return wrapper


def pick_backend(choice: str, device: torch.device) -> str:
    """gloo or nccl: ``auto`` is NCCL on a CUDA device, gloo otherwise; NCCL needs CUDA."""
    if choice not in BACKENDS:
        raise ValueError(f"dist backend must be {' or '.join(BACKENDS)}, not {choice!r}")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ValueError("the nccl backend needs a CUDA device; use gloo on CPU")
    return choice


def launched_world_size(env=os.environ) -> int:
    """WORLD_SIZE when torchrun (or another launcher setting RANK and WORLD_SIZE) started this
    process, else 1: a plain process is never distributed."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return 1
    return int(env["WORLD_SIZE"])


def torchrun_args(module: str, module_args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                  rdzv_endpoint: str = "") -> list[str]:
    """The torchrun (torch.distributed.run) command line that starts ``python -m module`` on
    ``nproc`` processes of this node. One node without an endpoint: ``--standalone`` (a free
    local port). Several nodes: static rendezvous at ``rdzv_endpoint`` (host:port of node 0),
    so global rank 0, the one serving gRPC, is on node 0."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"need nproc >= 1, nnodes >= 1 and 0 <= node_rank < nnodes; got {nproc}, {nnodes}, "
                         f"{node_rank}")
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0"]
    if nnodes == 1 and not rdzv_endpoint:
        args.append("--standalone")
    else:
        host, sep, port = rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"rdzv endpoint must be host:port, not {rdzv_endpoint!r}")
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                 "--master-addr", host.strip("[]"), "--master-port", port]
    return [*args, "-m", module, *module_args]


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def without_flags(argv: list[str], flags: tuple[str, ...] = LAUNCH_FLAGS) -> list[str]:
    """``argv`` less ``flags`` and their values (``--flag value`` or ``--flag=value``): the
    processes torchrun starts need no launch flags, and torchrun's own parser would take
    ``--nproc`` for an abbreviation of its ``--nproc-per-node``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in flags):
            kept.append(arg)
    return kept


def row_shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows; shares differ by at most one row and
    cover every row once, in order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass
class DataParallel:
    """This process's place in the trainer's process group, and the collectives a Step uses."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls, backend: str, device: torch.device, timeout_seconds: float = 600.0) -> "DataParallel":
        """Join the group torchrun described in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(pick_backend(backend, device), timeout=timedelta(seconds=timeout_seconds),
                                device_id=device if device.type == "cuda" else None)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def local_rows(self, n: int) -> torch.Tensor:
        """This rank's rows of an ``n``-row batch [n_local]."""
        return torch.arange(n, device=self.device)[row_shard(n, self.rank, self.world)]

    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a minibatch's row index [m] -> [m_local]."""
        return index[row_shard(len(index), self.rank, self.world)]

    @collective
    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Each rank's :meth:`local_rows` of a [n, ...] tensor -> the whole tensor, on every rank."""
        width = -(-n // self.world)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:len(range(n)[row_shard(n, r, self.world)])] for r, part in enumerate(parts)])

    @collective
    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in place. A gradient no rank has stays
        None (the optimizer then skips the parameter, as in one process); one that some rank
        lacks (an empty share of a small minibatch) counts as zeros there."""
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(present)
        with_grad = [p for p, count in zip(params, present.tolist()) if count > 0]
        for bucket in _buckets(with_grad, GRAD_BUCKET_ELEMENTS):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            offset = 0
            for p in bucket:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    @collective
    def sum_values(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks of a float tensor (statistics: float64)."""
        values = values.to(self.device).clone()
        dist.all_reduce(values)
        return values.cpu()

    @collective
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @collective
    def broadcast_json(self, value=None):
        """Rank 0's JSON-able ``value`` on every rank (the others pass None). JSON in a byte
        tensor, not pickle: ranks exchange data, never code."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        data = b""
        if self.is_leader:
            data = json.dumps(value).encode()
            size[0] = len(data)
        dist.broadcast(size, src=0)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.is_leader
                  else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(buffer, src=0)
        return value if self.is_leader else json.loads(bytes(buffer.cpu().tolist()))

    @collective
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank: all start from the same weights."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    @functools.cached_property
    def mesh(self):
        """The 1-D device mesh of every rank, which FSDP shards over."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is. A check on the
    local part needs no collective, so ranks may stop at different tensors."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (DTensor) tensor, gathered (a collective: every rank calls it in
    the same order); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes, e.g.
    GPT2Block): the units FSDP gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], parallel: DataParallel,
                      param_dtype: torch.dtype | None = None) -> None:
    """Shard ``model``'s parameters over the ranks with FSDP2 (``fully_shard``): each block, then
    the root (the rest: embeddings, final norm, value head). A forward all-gathers a block's
    parameters and frees them after; the backward reduce-scatters its gradients.

    The gradients are SUMMED over ranks (FSDP's default averages): the loss weights already
    divide by the whole minibatch's token count, as :meth:`DataParallel.sum_gradients` assumes.
    A divide factor of 1 alone becomes ``PREMUL_SUM(1.0)``, which gloo refuses ("Cannot use
    ReduceOp.PREMUL_SUM with Gloo"); with sum-only reductions it is plain ``ReduceOp.SUM``,
    which every backend has. ``param_dtype`` (bf16/fp16): the all-gathered
    parameters' dtype (MixedPrecisionPolicy); gradients are reduced in float32 and the shards
    stay float32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=param_dtype if param_dtype != torch.float32 else None,
                                     reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=parallel.mesh, mp_policy=precision)
    fully_shard(model, mesh=parallel.mesh, mp_policy=precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    buckets, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > limit:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return buckets + ([current] if current else [])


# ---------------------------------------------------------------- rank 0 leads, the others follow

class LeaderCalls:
    """Rank 0's way to change the trainer: each call goes to every other rank first, then runs
    here. Offers the trainer's ``apply_step`` and ``save_checkpoint``, so a server can hold
    either this or the trainer itself (one process)."""

    def __init__(self, trainer, parallel: DataParallel):
        self.trainer, self.parallel = trainer, parallel

    def apply_step(self, step_id: str, queries, responses, scores, min_response_tokens=None, policy_versions=None):
        self.parallel.broadcast_json({"call": "apply_step", "args": [step_id, queries, responses, scores,
                                                                     min_response_tokens, policy_versions]})
        return self.trainer.apply_step(step_id, queries, responses, scores, min_response_tokens, policy_versions)

    def save_checkpoint(self, directory, extra_files=None):
        self.parallel.broadcast_json({"call": "save_checkpoint", "directory": str(directory)})
        return self.trainer.save_checkpoint(directory, extra_files)

    def stop(self) -> None:
        """Let the other ranks leave :func:`follow_leader`."""
        self.parallel.broadcast_json({"call": "stop"})


def follow_leader(trainer, parallel: DataParallel) -> None:
    """The loop of every rank but 0: take part in each call rank 0 makes, until it says stop.
    A call that fails here as it fails on rank 0 (a refused Step, a rolled-back update) is
    logged and the loop goes on; a broken process group ends it."""
    while True:
        message = parallel.broadcast_json()
        call = message["call"]
        if call == "stop":
            return
        try:
            if call == "apply_step":
                trainer.apply_step(*message["args"])
            elif call == "save_checkpoint":
                trainer.save_checkpoint(Path(message["directory"]))
            else:
                raise RuntimeError(f"unknown call {call!r} from rank 0")
        except ProcessGroupFailed:
            raise
        except (ValueError, RuntimeError) as err:
            log.info("rank %d: %s failed as on rank 0: %s", parallel.rank, call, err)
