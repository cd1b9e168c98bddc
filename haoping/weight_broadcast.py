"""Policy weights from the trainer to its generators over torch.distributed. Pure of gRPC.

The group is the trainer (rank 0) and the generators that joined it, and nothing else: its own
TCPStore (served by the trainer on the address and port of its flags), a PrefixStore per group
id, and a gloo (CPU) or NCCL (GPU) backend made directly on that store, so the default process
group (a data-parallel trainer's, under torchrun) is never touched or needed.

One broadcast, every rank taking part:

1. rank 0 broadcasts a header: its length (int64 [1]), then the JSON bytes (uint8 [n]): the
   policy version, the bucket sizes and every tensor's name, dtype, shape, bucket and offset;
2. the header lays the tensors out in flat uint8 buckets (about ``bucket_bytes`` each, a tensor
   never split) and cuts them into spans: a large tensor is a span of its own, a run of small
   ones shares one. Rank 0 broadcasts every span at once (gloo runs them on its threads): a large
   contiguous tensor straight from its own storage (no copy), a run of small ones packed;
3. every receiver receives each span straight into its place in its buckets (buffers the caller
   may give, see :class:`ReceiveBuffers`), checks what arrived (the caller's check: names, shapes,
   dtype, finite, version), and all ranks all-reduce one status slot each, so rank 0 learns which
   ranks refused;
4. a receiver that accepted swaps the tensors in (the caller's to do, after :meth:`receive`): they
   are views into the buckets, so they can become the model's parameters without a copy.

A rank that dies makes the others' next collective fail (its sockets reset) or time out after
the group's timeout; the group is then broken for good (:class:`BroadcastFailed`) and a new one
is opened with the survivors.
"""
from __future__ import annotations

import bisect
import json
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
from torch.distributed import PrefixStore, TCPStore

from haoping.log import get_logger

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ALIGN = 64  # every tensor starts on a 64-byte boundary of its bucket, so a byte view can be viewed as its dtype
MAX_HEADER_BYTES = 16 << 20
STATUS_OK, STATUS_REFUSED = 0, 1
GLOO_THREADS = 4  # spans in flight at once run on their own threads
DIRECT_BYTES = 256 << 10  # a tensor this large travels as a span of its own (from its storage, no copy)


class BroadcastFailed(RuntimeError):
    """The group cannot carry weights any more (a rank died, timed out or sent nonsense)."""


class WeightsRefused(ValueError):
    """This receiver got the weights whole but its check refused them; the group stays usable."""


# ---------------------------------------------------------------- the header (pure)

@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int  # bytes into the bucket

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class Header:
    version: int
    buckets: tuple[int, ...]  # bytes of each bucket
    tensors: tuple[TensorSlot, ...]
    cancel: str = ""  # set: nothing follows; the receivers give up at once, the group stays usable
    # (bucket, start, end) byte ranges, one broadcast each, in bucket and offset order, every
    # tensor inside one; none given: each bucket whole
    spans: tuple[tuple[int, int, int], ...] = ()

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "buckets": list(self.buckets), "cancel": self.cancel,
                           "tensors": [[t.name, t.dtype, list(t.shape), t.bucket, t.offset] for t in self.tensors],
                           "spans": [list(span) for span in self.transfers]},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Header":
        """ValueError for anything but a well-formed header (the sizes are checked by the caller)."""
        try:
            raw = json.loads(data.decode())
            buckets = tuple(int(b) for b in raw["buckets"])
            tensors = tuple(TensorSlot(str(n), str(d), tuple(int(s) for s in shape), int(b), int(o))
                            for n, d, shape, b, o in raw["tensors"])
            spans = tuple((int(b), int(start), int(end)) for b, start, end in raw.get("spans", ()))
            header = cls(int(raw["version"]), buckets, tensors, str(raw.get("cancel", "")), spans)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"malformed weight header: {err}") from None
        if header.version < 0 or any(b < 0 for b in buckets):
            raise ValueError("malformed weight header: negative version or bucket size")
        for t in tensors:
            if t.dtype not in DTYPES:
                raise ValueError(f"weight header: {t.name} has dtype {t.dtype}, not one of {sorted(DTYPES)}")
            if not 0 <= t.bucket < len(buckets) or any(s < 0 for s in t.shape) or t.offset < 0 \
                    or t.offset + t.nbytes > buckets[t.bucket]:
                raise ValueError(f"weight header: {t.name} does not lie inside its bucket")
        spans = header.transfers
        for index, (b, start, end) in enumerate(spans):
            previous = spans[index - 1] if index else (0, 0, 0)
            if not 0 <= b < len(buckets) or not 0 <= start <= end <= buckets[b] \
                    or (b, start) < (previous[0], previous[2]):
                raise ValueError(f"weight header: span {index} {[b, start, end]} is outside its bucket or out of order")
        for t in tensors:  # every byte of every tensor arrives: it lies inside one span
            at = bisect.bisect_right(spans, (t.bucket, t.offset, float("inf"))) - 1
            if t.nbytes and not (at >= 0 and spans[at][0] == t.bucket and t.offset + t.nbytes <= spans[at][2]):
                raise ValueError(f"weight header: {t.name} lies in no span")
        return header

    @property
    def total_bytes(self) -> int:
        return sum(self.buckets)

    @property
    def transfers(self) -> tuple[tuple[int, int, int], ...]:
        """The spans to broadcast: the header's, or each bucket whole."""
        return self.spans or tuple((b, 0, nbytes) for b, nbytes in enumerate(self.buckets))

    def span_slots(self) -> list[list[TensorSlot]]:
        """The tensors inside each span of :attr:`transfers`, in order."""
        spans = self.transfers
        inside: list[list[TensorSlot]] = [[] for _ in spans]
        for t in self.tensors:
            at = bisect.bisect_right(spans, (t.bucket, t.offset, float("inf"))) - 1
            if t.nbytes and at >= 0:
                inside[at].append(t)
        return inside


def plan_header(version: int, tensors: dict[str, torch.Tensor], bucket_bytes: int,
                direct_bytes: int = DIRECT_BYTES) -> Header:
    """Tensors in order, packed into buckets of at most ``bucket_bytes`` (a larger tensor gets a
    bucket of its own; tensors are never split), and the spans they travel in: a tensor of at
    least ``direct_bytes`` alone, each run of smaller ones in the same bucket together."""
    buckets: list[int] = []
    slots = []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be broadcast (one of {sorted(DTYPES)})")
        nbytes = tensor.numel() * tensor.element_size()
        start = -(-buckets[-1] // ALIGN) * ALIGN if buckets else 0
        if not buckets or (start + nbytes > bucket_bytes and buckets[-1] > 0):
            buckets.append(0)
            start = 0
        slots.append(TensorSlot(name, dtype, tuple(tensor.shape), len(buckets) - 1, start))
        buckets[-1] = start + nbytes
    spans: list[list[int]] = []
    run_open = False  # the last span is a run of small tensors that may grow
    for slot in slots:
        if not slot.nbytes:
            continue
        end = slot.offset + slot.nbytes
        if slot.nbytes >= direct_bytes:
            spans.append([slot.bucket, slot.offset, end])
            run_open = False
        elif run_open and spans[-1][0] == slot.bucket:
            spans[-1][2] = end
        else:
            spans.append([slot.bucket, slot.offset, end])
            run_open = True
    return Header(version, tuple(buckets), tuple(slots), spans=tuple(tuple(span) for span in spans))


def unpack(header: Header, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as views into the received bucket buffers (no copy)."""
    return {t.name: buffers[t.bucket][t.offset:t.offset + t.nbytes].view(DTYPES[t.dtype]).reshape(t.shape)
            for t in header.tensors}


# ---------------------------------------------------------------- the process group

def _gloo_group(store, rank: int, world: int, host: str, timeout: timedelta):
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._threads = GLOO_THREADS
    # bound to this host's group address (peers connect to it), not whatever the hostname resolves to
    options._devices = [ProcessGroupGloo.create_device(hostname=host) if host
                        else ProcessGroupGloo.create_default_device()]
    return ProcessGroupGloo(store, rank, world, options)


def _nccl_group(store, rank: int, world: int, timeout: timedelta):
    from torch.distributed.distributed_c10d import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(store, rank, world, options)


class WeightGroup:
    """One rank's handle on a weight group. Rank 0 sends (:meth:`broadcast`), the others receive."""

    def __init__(self, store, group_id: str, rank: int, world: int, host: str, timeout: float,
                 device: torch.device = torch.device("cpu")):
        self.group_id, self.rank, self.world, self.device = group_id, rank, world, torch.device(device)
        self.timeout = timedelta(seconds=timeout)
        prefixed = PrefixStore(f"haoping-weights/{group_id}", store)
        try:
            self._pg = (_nccl_group(prefixed, rank, world, self.timeout) if self.device.type == "cuda"
                        else _gloo_group(prefixed, rank, world, host, self.timeout))
        except RuntimeError as err:  # a rank that never came, or a store gone
            raise BroadcastFailed(f"weight group {group_id}: rendezvous of {world} ranks failed: {err}") from None
        self.broken: str | None = None
        self._buffers: list[torch.Tensor] = []  # a receiver's own buckets (when the caller gives none)
        self._staging: list[torch.Tensor] = []  # rank 0: packed spans' buffers, kept for the next broadcast
        self.last_phases: Phases = Phases()
        self._store = store  # kept alive as long as the group

    def _check_usable(self) -> None:
        if self.broken:
            raise BroadcastFailed(f"weight group {self.group_id} is broken ({self.broken}); open a new one")

    def _collective(self, what: str, run: Callable[[], None]) -> None:
        try:
            run()
        except RuntimeError as err:  # gloo/NCCL: a peer reset, a timeout
            raise self._break(f"{what}: {err}".splitlines()[0][:300]) from None

    def _break(self, reason: str) -> BroadcastFailed:
        self.broken = reason
        self.abort()
        return BroadcastFailed(f"weight group {self.group_id}: {reason}")

    def abort(self) -> None:
        """Close this rank's connections: the other ranks' pending collectives fail at once
        (their peer closed) instead of waiting out the timeout."""
        pg, self._pg = self._pg, None
        if pg is None:
            return
        for close in (pg.abort, pg.shutdown):
            try:
                close()
            except RuntimeError as err:
                log.debug("closing weight group %s: %s", self.group_id, err)
        del pg  # the last reference: gloo closes its sockets

    def _bcast(self, tensor: torch.Tensor):
        from torch.distributed import BroadcastOptions

        options = BroadcastOptions()
        options.rootRank, options.rootTensor, options.timeout = 0, 0, self.timeout
        return self._pg.broadcast([tensor], options)

    def _statuses(self, mine: int) -> list[int]:
        from torch.distributed import AllreduceOptions, ReduceOp

        slots = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        slots[self.rank] = mine
        options = AllreduceOptions()
        options.reduceOp, options.timeout = ReduceOp.SUM, self.timeout
        self._collective("status", lambda: self._pg.allreduce([slots], options).wait())
        return slots.tolist()

    # -------------------------------------------------------- rank 0

    def broadcast(self, version: int, tensors: dict[str, torch.Tensor], bucket_bytes: int,
                  direct_bytes: int = DIRECT_BYTES) -> "BroadcastReport":
        """Send ``tensors`` as ``version`` to every rank; BroadcastFailed when the group cannot.
        The tensors must not change until it returned (large ones are sent from their storage)."""
        assert self.rank == 0
        self._check_usable()
        phases = Phases()
        with phases("header"):
            header = plan_header(version, tensors, bucket_bytes, direct_bytes)
            self._send_header(header)
        spare, used, works = self._staging, [], []
        for index, (span, slots) in enumerate(zip(header.transfers, header.span_slots())):
            with phases("pack"):  # while the spans before are on the wire
                source = self._span_bytes(tensors, span, slots, spare, used)
            with phases("transfer"):  # all in flight at once; the sources live until done
                self._collective(f"span {index}", lambda source=source: works.append(self._bcast(source)))
        with phases("transfer"):
            for index, work in enumerate(works):
                self._collective(f"span {index}", work.wait)
        self._staging = used + spare
        with phases("status"):
            statuses = self._statuses(STATUS_OK)
        refused = [rank for rank, status in enumerate(statuses) if status != STATUS_OK]
        return BroadcastReport(version, header.total_bytes, phases.total, refused, self.world - 1, dict(phases))

    def _span_bytes(self, tensors: dict[str, torch.Tensor], span: tuple[int, int, int], slots: list[TensorSlot],
                    spare: list[torch.Tensor], used: list[torch.Tensor]) -> torch.Tensor:
        """A span's bytes: one contiguous tensor's own storage as it is, else packed into the
        smallest ``spare`` buffer it fits (moved to ``used``; a new one when none does)."""
        _, start, end = span
        if len(slots) == 1 and slots[0].offset == start and slots[0].nbytes == end - start:
            tensor = tensors[slots[0].name].detach()
            if tensor.is_contiguous() and tensor.device == self.device:
                return tensor.reshape(-1).view(torch.uint8)
        fits = sorted((b.numel(), i) for i, b in enumerate(spare) if b.numel() >= end - start)
        buffer = spare.pop(fits[0][1]) if fits else torch.zeros(end - start, dtype=torch.uint8, device=self.device)
        used.append(buffer)
        packed = buffer[:end - start]
        for slot in slots:
            at = slot.offset - start
            packed[at:at + slot.nbytes].copy_(tensors[slot.name].detach().reshape(-1).view(torch.uint8))
        return packed

    def _send_header(self, header: Header) -> None:
        data = header.to_bytes()
        self._collective("header", lambda: self._bcast(torch.tensor([len(data)], dtype=torch.int64)).wait())
        self._collective("header", lambda: self._bcast(
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)).wait())

    def cancel(self, version: int, reason: str) -> None:
        """Tell the members waiting in :meth:`receive` that no weights come this time."""
        assert self.rank == 0
        self._check_usable()
        self._send_header(Header(version, (), (), reason or "cancelled"))

    # -------------------------------------------------------- every other rank

    def receive(self, check: Callable[[dict[str, torch.Tensor], int], None], max_bytes: int,
                into: Callable[[tuple[int, ...]], list[torch.Tensor]] | None = None
                ) -> tuple[int, dict[str, torch.Tensor]]:
        """Take part in one broadcast: (version, tensors) when ``check(tensors, version)`` passed;
        WeightsRefused (the group stays usable) when it raised ValueError; BroadcastFailed when the
        group failed. ``max_bytes`` bounds what this rank allocates; beyond it, it still takes part
        but discards (one scratch buffer) and refuses.

        The tensors are views into uint8 buckets: ``into(sizes)`` gives them (e.g.
        :meth:`ReceiveBuffers.spare`, so that they can become the model's weights); without it,
        this group's own, reused by the next receive (copy out of them before). The phases'
        seconds are in :attr:`last_phases` afterwards."""
        assert self.rank != 0
        self._check_usable()
        phases = self.last_phases = Phases()
        with phases("header"):
            header = self._receive_header()
        if header.cancel:
            raise WeightsRefused(f"the trainer sent no weights: {header.cancel}")
        problem = None
        spans = header.transfers
        if header.total_bytes <= max_bytes:
            buffers = into(header.buckets) if into is not None else self._own_buffers(header.buckets)
            assert [b.numel() for b in buffers] == list(header.buckets) and all(b.dtype == torch.uint8 for b in buffers)
            with phases("transfer"):
                works = []
                for index, (bucket, start, end) in enumerate(spans):  # straight into place
                    self._collective(f"span {index}", lambda target=buffers[bucket][start:end]:
                                     works.append(self._bcast(target)))
                for index, work in enumerate(works):
                    self._collective(f"span {index}", work.wait)
            with phases("check"):
                tensors = unpack(header, buffers)
                try:
                    check(tensors, header.version)
                except ValueError as err:
                    problem = str(err)
        else:
            problem = (f"weights of {header.total_bytes} bytes exceed the {max_bytes} bytes this generator "
                       "accepts (its own policy's size, in float32, twice over)")
            largest = max((end - start for _, start, end in spans), default=0)
            if largest > max_bytes:
                raise self._break(problem)
            scratch = torch.empty(max(largest, 1), dtype=torch.uint8, device=self.device)
            for index, (_, start, end) in enumerate(spans):
                self._collective(f"span {index}", lambda n=end - start: self._bcast(scratch[:n]).wait())
        with phases("status"):
            self._statuses(STATUS_REFUSED if problem else STATUS_OK)
        if problem:
            raise WeightsRefused(problem)
        return header.version, tensors

    def _receive_header(self) -> Header:
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._collective("header", lambda: self._bcast(length).wait())
        n = int(length.item())
        if not 0 < n <= MAX_HEADER_BYTES:
            raise self._break(f"header of {n} bytes (at most {MAX_HEADER_BYTES})")
        raw = torch.empty(n, dtype=torch.uint8, device=self.device)
        self._collective("header", lambda: self._bcast(raw).wait())
        try:
            return Header.from_bytes(raw.cpu().numpy().tobytes())
        except ValueError as err:
            raise self._break(str(err)) from None  # cannot even tell how many spans follow: out of step

    def _own_buffers(self, sizes: tuple[int, ...]) -> list[torch.Tensor]:
        """The previous receive's buffers when the layout is the same (the caller copied out of them)."""
        if [b.numel() for b in self._buffers] != list(sizes):
            self._buffers = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        return self._buffers


class ReceiveBuffers:
    """Two sets of receive buckets a receiver takes turns with, so that weights received into one
    can become the model's parameters (views into it, no copy) while the next broadcast lands in
    the other. Which set is free is read off the serving tensors' memory, not remembered: a
    refused or failed broadcast, or weights copied in instead, leave nothing to get out of step."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self._sets: list[list[torch.Tensor]] = [[], []]

    def spare(self, sizes: tuple[int, ...], serving: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 buffers of ``sizes`` that share no memory with any of ``serving``."""
        starts = [t.data_ptr() for t in serving if t.numel()]

        def in_use(buffers: list[torch.Tensor]) -> bool:
            return any(b.data_ptr() <= p < b.data_ptr() + b.numel() for b in buffers if b.numel() for p in starts)

        free = [i for i, buffers in enumerate(self._sets) if not in_use(buffers)]
        # none free (serving tensors in both sets): a new set; the model keeps alive what it uses
        index = free[0] if free else 0
        if not free or [b.numel() for b in self._sets[index]] != list(sizes):
            self._sets[index] = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        return self._sets[index]


class Phases(dict):
    """Seconds per named phase of one broadcast, for the report (``with phases("transfer"): ...``)."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started

    @property
    def total(self) -> float:
        return sum(self.values())


@dataclass(frozen=True)
class BroadcastReport:
    version: int
    bytes: int  # sent once to every receiver
    seconds: float
    refused_ranks: list[int]
    receivers: int
    phases: dict[str, float] = field(default_factory=dict)  # header, pack, transfer, status


# ---------------------------------------------------------------- the trainer's side: store and groups

def listening_store(address: str, port: int, timeout: float) -> TCPStore:
    """The group's TCPStore, listening on ``address:port`` only (0: a free port), not every interface."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    store = TCPStore(address, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout), master_listen_fd=sock.detach())
    return store


def client_store(address: str, port: int, timeout: float) -> TCPStore:
    return TCPStore(address, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout))


class GroupFull(LookupError):
    pass


@dataclass
class _OpenGroup:
    group_id: str
    world: int
    members: dict[str, int] = field(default_factory=dict)  # member id -> rank
    ready: Future | None = None  # rank 0's WeightGroup once every rank connected


class WeightGroupHost:
    """Rank 0's side: the store (started on first use) and the one current group.

    :meth:`open` names a new group for ``generators`` members and starts rank 0's rendezvous in
    the background; each generator :meth:`join`\\ s it (a rank per member id) and connects; then
    :meth:`broadcast` sends. Opening a new group drops the previous one."""

    def __init__(self, address: str, port: int, timeout: float, bucket_bytes: int, max_generators: int,
                 device: torch.device = torch.device("cpu"), direct_bytes: int = DIRECT_BYTES):
        self.address, self.requested_port, self.timeout = address, port, timeout
        self.bucket_bytes, self.max_generators, self.device = bucket_bytes, max_generators, device
        self.direct_bytes = direct_bytes
        self._store: TCPStore | None = None
        self._group: _OpenGroup | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._store.port if self._store is not None else self.requested_port

    def open(self, generators: int) -> _OpenGroup:
        if not 1 <= generators <= self.max_generators:
            raise ValueError(f"generators must be in [1, {self.max_generators}], got {generators}")
        with self._lock:
            if self._store is None:
                self._store = listening_store(self.address, self.requested_port, self.timeout)
                log.info("weight group store listening on %s:%d", self.address, self._store.port)
            group = _OpenGroup(secrets.token_hex(16), generators + 1, ready=Future())
            # a thread of its own: a previous group's rendezvous still waiting for absent members
            # must not hold this one up
            threading.Thread(target=self._rendezvous, args=(group,), name="weight-group", daemon=True).start()
            self._group = group
            return group

    def _rendezvous(self, group: _OpenGroup) -> None:
        try:
            group.ready.set_result(WeightGroup(self._store, group.group_id, 0, group.world, self.address,
                                               self.timeout, self.device))
        except BaseException as err:  # BroadcastFailed: a member never came
            group.ready.set_exception(err)

    def join(self, group_id: str, member_id: str) -> tuple[_OpenGroup, int]:
        """(the group, this member's rank); LookupError for a group that is not the open one,
        GroupFull when every rank is taken."""
        with self._lock:
            group = self._group
            if group is None or group.group_id != group_id:
                raise LookupError(f"weight group {group_id[:40]!r} is not the trainer's open group")
            if member_id not in group.members:
                if len(group.members) >= group.world - 1:
                    raise GroupFull(f"weight group {group_id} already has its {group.world - 1} generators")
                group.members[member_id] = len(group.members) + 1
            return group, group.members[member_id]

    def _handle(self, group_id: str) -> WeightGroup:
        with self._lock:
            group = self._group
        if group is None or group.group_id != group_id:
            raise LookupError(f"weight group {group_id[:40]!r} is not the trainer's open group")
        try:
            return group.ready.result(timeout=self.timeout + 5)
        except TimeoutError:
            raise BroadcastFailed(f"weight group {group_id}: not every generator joined within "
                                  f"{self.timeout:.0f}s") from None

    def broadcast(self, group_id: str, version: int, tensors: dict[str, torch.Tensor]) -> BroadcastReport:
        return self._handle(group_id).broadcast(version, tensors, self.bucket_bytes, self.direct_bytes)

    def cancel(self, group_id: str, version: int, reason: str) -> None:
        """No broadcast this time (e.g. the version asked for is not held): the members stop waiting."""
        self._handle(group_id).cancel(version, reason)
