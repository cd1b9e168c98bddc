"""Generator service: a thin gRPC adapter over :class:`haoping.generation.PolicyGenerator`."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import queue
import threading
import time
from contextlib import contextmanager

import grpc

from haoping.client import make_channel, read_token_file
from haoping.errors import Cancelled
from haoping.generation import LENGTH, PolicyGenerator, SampleSpec, SamplingParams, sample_seed
from haoping.log import get_logger, setup_logging
from haoping.models import parse_dtype, pick_device
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from haoping.weight_files import read_weight_file
from services.common import metrics
from services.common.batching import ContinuousBatcher, QueueFull, ShuttingDown
from services.common.config import add_batching_flags, add_common_server_flags, add_flag
from services.common.security import check_security_flags, client_tls
from services.common.server import Draining, configure_torch, serve
from services.generator.weight_group import GeneratorWeightGroup, add_weight_group_flags

log = get_logger(__name__)
FINISH = {"eos": pb.FINISH_REASON_EOS, LENGTH: pb.FINISH_REASON_LENGTH}
MAX_TRAINER_CHANNELS = 4
UINT32_MAX = 2**32 - 1


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, generator: PolicyGenerator, args, draining: Draining):
        self.generator = generator
        self.draining = draining
        self.default_max_new_tokens = args.default_max_new_tokens
        self.max_new_tokens_limit = min(args.max_new_tokens_limit, generator.max_context - 1)
        self.max_samples_per_prompt = args.max_samples_per_prompt
        self.max_prompts = args.max_prompts
        self.max_prompt_chars = args.max_prompt_chars
        self.max_request_tokens = args.max_request_tokens
        self.work = WorkBudget(args.max_queued_tokens)
        # the only peers LoadWeights dials: the trainer(s) this generator was started with
        self.trainer_addresses = [a.strip() for a in args.trainer_address.split(",") if a.strip()]
        self.max_message_bytes = args.max_message_mb * 1024 * 1024
        # a weights file of this policy: its parameters as float32 (the trainer's master copy), a
        # header and slack; a larger announcement is refused before its buffer is allocated
        self.max_weights_bytes = 2 * 4 * sum(p.numel() for p in self.generator.model.parameters()) + (1 << 20)
        self._peer_token = read_token_file(args.auth_token_file) if args.auth_token_file else None
        self.local_weights_dir = args.local_weights_dir
        self._streaming_trainers: set[str] = set()  # trainers whose weight files this one could not use
        self._peer_tls = client_tls(args)
        self._trainer_channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        self.batcher = ContinuousBatcher("generator", generator.open_batch, args.max_batch_size,
                                         args.max_wait_ms / 1000, args.max_queue)
        metrics.POLICY_VERSION.labels("generator").set(0)
        self.weight_group = GeneratorWeightGroup(self, args)

    # ------------------------------------------------------------ validation

    def _specs(self, request: pb.GenerateRequest, context) -> list[tuple[int, int, SampleSpec]]:
        """Check a request like TGI's validation does; abort with INVALID_ARGUMENT naming the field."""
        def bad(message: str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "generator is draining")
        if not request.prompts:
            bad("prompts must not be empty")
        if len(request.prompts) > self.max_prompts:
            bad(f"at most {self.max_prompts} prompts per request, got {len(request.prompts)}")
        for p_index, prompt in enumerate(request.prompts):  # by size, before any tokenizing
            if len(prompt) > self.max_prompt_chars:
                bad(f"prompt {p_index} has {len(prompt)} characters; at most {self.max_prompt_chars}")
        n = request.samples_per_prompt if request.HasField("samples_per_prompt") else 1
        if not 1 <= n <= self.max_samples_per_prompt:
            bad(f"samples_per_prompt must be in [1, {self.max_samples_per_prompt}], got {n}")
        max_new = request.max_new_tokens if request.HasField("max_new_tokens") else self.default_max_new_tokens
        if not 1 <= max_new <= self.max_new_tokens_limit:
            bad(f"max_new_tokens must be in [1, {self.max_new_tokens_limit}], got {max_new}")
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if math.isnan(temperature) or temperature < 0 or math.isinf(temperature):
            bad(f"temperature must be a finite number >= 0, got {temperature}")
        if request.top_k < 0:
            bad(f"top_k must be >= 0, got {request.top_k}")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not 0 < top_p <= 1:  # also rejects NaN
            bad(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= request.min_new_tokens <= max_new:
            bad(f"min_new_tokens must be in [0, max_new_tokens={max_new}], got {request.min_new_tokens}")
        if request.first_sample_index + n - 1 > UINT32_MAX:  # sample_index is a uint32
            bad(f"first_sample_index + samples_per_prompt must stay within {UINT32_MAX + 1}, got "
                f"{request.first_sample_index} + {n}")
        work = len(request.prompts) * n * max_new
        if work > self.max_request_tokens:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"request too large: prompts x samples_per_prompt x max_new_tokens = {work} tokens, at "
                          f"most {self.max_request_tokens} (--max-request-tokens); split it into smaller requests")
        seed = request.seed if request.HasField("seed") else int.from_bytes(os.urandom(8), "little") >> 1
        params = SamplingParams(max_new, temperature, request.top_k, top_p, request.min_new_tokens)
        specs = []
        for p_index, prompt in enumerate(request.prompts):
            if not prompt.strip():
                bad(f"prompt {p_index} is empty")
            ids = self.generator.encode(prompt)
            if len(ids) + max_new > self.generator.max_context:
                bad(f"prompt {p_index} has {len(ids)} tokens; with max_new_tokens={max_new} that exceeds "
                    f"the model context of {self.generator.max_context}")
            for s_index in range(request.first_sample_index, request.first_sample_index + n):
                specs.append((p_index, s_index, SampleSpec(tuple(ids), params, sample_seed(seed, p_index, s_index))))
        return specs

    # ------------------------------------------------------------ RPCs

    def _sample_message(self, prompt: str, p_index, s_index, sample, version) -> pb.Sample:
        """``full_text`` is the prompt exactly as sent (the model saw its token ids, in which a
        character the vocabulary lacks is [UNK]) plus the clean continuation."""
        text = self.generator.decode(sample.response_ids, after=prompt)
        return pb.Sample(prompt_index=p_index, sample_index=s_index, prompt_token_ids=sample.prompt_ids,
                         response_token_ids=sample.response_ids, text=text, full_text=prompt + text,
                         finish_reason=FINISH[sample.finish_reason], policy_version=version)

    def _record(self, samples) -> None:
        for sample in samples:
            metrics.GENERATED_TOKENS.inc(len(sample.response_ids))
            metrics.GENERATED_SAMPLES.labels(sample.finish_reason).inc()

    def _run(self, specs, context, arrival, on_step=None):
        """Through the continuous batcher: the samples join the running batch at the next token step."""
        started = time.perf_counter()
        try:
            with self.work.reserve(sum(s.params.max_new_tokens for _, _, s in specs)):
                samples, version = self.batcher.submit([s for _, _, s in specs], lambda: not context.is_active(),
                                                       on_step, arrival)
        except QueueFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Cancelled:
            context.abort(grpc.StatusCode.CANCELLED, "request cancelled by the client")
        except ShuttingDown as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        self._record(samples)
        return samples, version, time.perf_counter() - started

    @metrics.GENERATE_REQUEST_DURATION.labels("Generate").time()
    def Generate(self, request, context):
        with self.batcher.arriving() as arrival:
            specs = self._specs(request, context)
            samples, version, seconds = self._run(specs, context, arrival)
        return pb.GenerateResponse(
            samples=[self._sample_message(request.prompts[p], p, s, sample, version)
                     for (p, s, _), sample in zip(specs, samples)],
            policy_version=version, seconds=seconds)

    def GenerateStream(self, request, context):
        with metrics.GENERATE_REQUEST_DURATION.labels("GenerateStream").time(), self.batcher.arriving() as arrival:
            yield from self._generate_stream(request, context, arrival)

    def _generate_stream(self, request, context, arrival):
        specs = self._specs(request, context)
        # the batcher's thread queues each decode step's tokens (a copy); this thread decodes them to text
        steps: queue.Queue = queue.Queue()
        sent_text = [""] * len(specs)

        def on_step(outputs, finished):
            steps.put([out.response_ids if done else list(out) for out, done in zip(outputs, finished)])

        result: dict = {}

        def work():
            try:
                result["value"] = self._run(specs, context, arrival, on_step)
            except BaseException as err:  # surfaced to the caller below
                result["error"] = err
            finally:
                steps.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (responses := steps.get()) is not None:
            for i, ids in enumerate(responses):
                text = self.generator.decode(ids, after=request.prompts[specs[i][0]])
                if text != sent_text[i] and text.startswith(sent_text[i]):
                    yield pb.GenerateStreamResponse(prompt_index=specs[i][0], sample_index=specs[i][1],
                                                    text_delta=text[len(sent_text[i]):])
                    sent_text[i] = text
        if "error" in result:
            raise result["error"]
        samples, version, _ = result["value"]
        for i, ((p, s, _), sample) in enumerate(zip(specs, samples)):
            message = self._sample_message(request.prompts[p], p, s, sample, version)
            yield pb.GenerateStreamResponse(prompt_index=p, sample_index=s,
                                            text_delta=message.text[len(sent_text[i]):]
                                            if message.text.startswith(sent_text[i]) else "",
                                            finished=True, sample=message)

    def LoadWeights(self, request, context):
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "generator is draining")
        address = self._allowed_peer(request.trainer_address, context)
        started = time.perf_counter()
        stub = pb_grpc.TrainerStub(self._trainer_channel(address))
        try:
            fetched = self._fetch_weight_file(stub, address, request.version) if self.local_weights_dir else None
            transport = "file" if fetched is not None else "stream"
            data, version = fetched or assemble_weights(
                stub.GetWeights(pb.GetWeightsRequest(version=request.version), timeout=300), context,
                self.max_weights_bytes)
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # the trainer refused this generator's token, not the caller's: say so
                code = grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, f"fetching weights from {address}: {err.details()}")
        fetch_seconds = time.perf_counter() - started
        try:
            self.batcher.run_when_idle(lambda: self.generator.load_weights(data, version))
        except ShuttingDown as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except ValueError as err:
            metrics.WEIGHT_LOADS_REFUSED.labels("unfit").inc()
            log.warning("refused weights from %s: %s; version %d keeps serving", address, err, self.generator.version)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        seconds = time.perf_counter() - started
        metrics.WEIGHT_LOAD_DURATION.observe(seconds)
        metrics.WEIGHT_BYTES.labels("received" if transport == "stream" else "read").inc(len(data))
        metrics.POLICY_VERSION.labels("generator").set(self.generator.version)
        log.info("loaded policy version %d (%.1f MB by %s in %.3fs)", self.generator.version, len(data) / 1e6,
                 transport, seconds)
        return pb.LoadWeightsResponse(policy_version=self.generator.version, bytes=len(data), seconds=seconds,
                                      transport=transport,
                                      phase_seconds={"fetch": fetch_seconds, "load": seconds - fetch_seconds})

    def _fetch_weight_file(self, stub, address: str, version: int) -> tuple[bytearray, int] | None:
        """(the file, its version) read from --local-weights-dir after the trainer wrote it there;
        None, to stream instead, when that trainer keeps no such folder or this one cannot read its
        file (e.g. the folder is not in fact shared): logged once per trainer."""
        try:
            chunks = list(stub.GetWeights(pb.GetWeightsRequest(version=version, as_local_file=True), timeout=300))
            if len(chunks) != 1 or chunks[0].data:
                raise ValueError(f"the trainer answered as_local_file with {len(chunks)} chunks, not one without data")
            chunk = chunks[0]
            return read_weight_file(self.local_weights_dir, chunk.policy_version, chunk.file_tag,
                                    chunk.total_bytes, self.max_weights_bytes), chunk.policy_version
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            problem = err.details()
        except (OSError, ValueError) as err:
            problem = str(err) or type(err).__name__
        if address not in self._streaming_trainers:
            self._streaming_trainers.add(address)
            log.warning("weights from %s come by stream, not through --local-weights-dir %s: %s", address,
                        self.local_weights_dir, problem)
        return None

    def JoinWeightGroup(self, request, context):
        return self.weight_group.join(request, context)

    def ReceiveWeights(self, request, context):
        return self.weight_group.receive(request, context)

    def _allowed_peer(self, requested: str, context) -> str:
        """The trainer to pull from: the request may only pick one of --trainer-address, and
        anything else is refused before any connection is made (no probing ports through us)."""
        if not self.trainer_addresses:
            metrics.WEIGHT_LOADS_REFUSED.labels("peer").inc()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this generator was started without --trainer-address, so it loads no weights")
        if not requested:
            return self.trainer_addresses[0]
        if requested not in self.trainer_addresses:
            metrics.WEIGHT_LOADS_REFUSED.labels("peer").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"trainer_address {requested[:100]!r} is not one this generator was started with "
                          f"(--trainer-address {','.join(self.trainer_addresses)}); leave it empty for the first")
        return requested

    def _trainer_channel(self, address: str) -> grpc.Channel:
        """A channel kept open per trainer address (a few at most): a weight sync every PPO cycle
        should not pay a new connection each time."""
        with self._channels_lock:
            channel = self._trainer_channels.pop(address, None)
            if channel is None:
                channel = make_channel(address, self._peer_token, self._peer_tls, self.max_message_bytes)
            self._trainer_channels[address] = channel  # most recently used last
            while len(self._trainer_channels) > MAX_TRAINER_CHANNELS:
                # dropped, not closed: a LoadWeights on another thread may still be fetching through
                # it; the channel closes once its last stub is gone
                del self._trainer_channels[next(iter(self._trainer_channels))]
            return channel

    def GetInfo(self, request, context):
        g = self.generator
        return pb.ServiceInfo(
            service="generator", model_id=g.model_ref, policy_version=g.version, dtype=str(g.dtype).split(".")[-1],
            device=str(g.device), max_context=g.max_context,
            limits={"max_new_tokens": self.max_new_tokens_limit, "default_max_new_tokens": self.default_max_new_tokens,
                    "max_samples_per_prompt": self.max_samples_per_prompt, "max_prompts": self.max_prompts,
                    "max_message_bytes": self.max_message_bytes, "max_prompt_chars": self.max_prompt_chars,
                    "max_request_tokens": self.max_request_tokens, "max_queued_tokens": self.work.limit,
                    "max_weights_bytes": self.max_weights_bytes,
                    "local_weight_files": int(bool(self.local_weights_dir)),
                    "max_broadcast_weight_bytes": self.weight_group.max_bytes})


class WorkBudget:
    """Generation work (samples x max_new_tokens) admitted and not yet answered, bounded: a
    request that would take it past ``limit`` gets QueueFull (RESOURCE_EXHAUSTED) at once,
    so a few large requests cannot queue up hours of work ahead of everyone else."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, work: int):
        with self._lock:
            fits = self.used + work <= self.limit
            if fits:
                self.used += work
                metrics.QUEUED_WORK_TOKENS.set(self.used)
        if not fits:
            raise QueueFull(f"generator busy: {self.used} tokens of work admitted, this request adds {work}, "
                            f"at most {self.limit} (--max-queued-tokens); retry later")
        try:
            yield
        finally:
            with self._lock:
                self.used -= work
                metrics.QUEUED_WORK_TOKENS.set(self.used)


def assemble_weights(chunks, context, max_bytes: int) -> tuple[bytearray, int]:
    """(the file, its policy version): streamed chunks joined as they arrive into one buffer of
    the announced size (at most ``max_bytes``); order, size and sha256 checked before anything
    is loaded. A chunk is dropped once copied, so the stream never sits in memory twice."""
    data: bytearray | None = None
    first = None
    digest = hashlib.sha256()
    filled = 0
    for chunk in chunks:
        if first is None:
            first = chunk
            if chunk.total_bytes > max_bytes:
                context.abort(grpc.StatusCode.DATA_LOSS, f"trainer announced {chunk.total_bytes} bytes of weights; "
                                                         f"this policy's fit in {max_bytes}")
            data = bytearray(chunk.total_bytes)
        if (chunk.offset != filled or chunk.policy_version != first.policy_version
                or filled + len(chunk.data) > len(data)):
            context.abort(grpc.StatusCode.DATA_LOSS, "weight chunks out of order or of mixed versions")
        data[filled:filled + len(chunk.data)] = chunk.data
        digest.update(chunk.data)
        filled += len(chunk.data)
    if first is None:
        context.abort(grpc.StatusCode.DATA_LOSS, "trainer sent no weight chunks")
    if filled != first.total_bytes or digest.hexdigest() != first.sha256:
        context.abort(grpc.StatusCode.DATA_LOSS, "weights arrived incomplete or corrupted (size/sha256 mismatch)")
    return data, first.policy_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haoping serve generator", description=__doc__)
    add_common_server_flags(parser, port=50051, metrics_port=9101)
    add_flag(parser, "--model", "starter:policy", help="policy: starter:policy, a local dir or a hub ID")
    add_flag(parser, "--trainer-address", "",
             help="trainer host:port (a comma list for several) that LoadWeights pulls from, with this "
                  "service's own token and TLS settings; LoadWeights refuses any other address")
    add_flag(parser, "--local-weights-dir", "",
             help="folder shared with a co-located trainer started with the same --local-weights-dir: LoadWeights "
                  "reads the policy file it writes there instead of streaming it (falls back to the stream)")
    add_flag(parser, "--default-max-new-tokens", 16, int, "max_new_tokens when a request leaves it unset")
    add_flag(parser, "--max-new-tokens-limit", 256, int, "largest max_new_tokens a request may ask for")
    add_flag(parser, "--max-samples-per-prompt", 64, int, "largest samples_per_prompt")
    add_flag(parser, "--max-prompts", 256, int, "most prompts in one request")
    add_flag(parser, "--max-prompt-chars", 8192, int, "longest prompt in characters (checked before tokenizing)")
    add_flag(parser, "--max-request-tokens", 131072, int,
             "most work in one request: prompts x samples_per_prompt x max_new_tokens")
    add_flag(parser, "--max-queued-tokens", 524288, int,
             "most work admitted at once over all requests (samples x max_new_tokens); beyond it "
             "RESOURCE_EXHAUSTED at once")
    add_weight_group_flags(parser)
    add_batching_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_security_flags(parser, args)
    configure_torch(args)
    if args.max_queued_tokens < args.max_request_tokens:
        parser.error("--max-queued-tokens must be at least --max-request-tokens")
    generator = PolicyGenerator(args.model, pick_device(args.device), parse_dtype(args.dtype))
    log.info("policy %s on %s in %s", args.model, generator.device, str(generator.dtype).split(".")[-1])
    draining = Draining()
    service = GeneratorService(generator, args, draining)

    def warm_up():
        # through the batcher, on its thread, like every weight load: torch work on a second
        # thread would start a second OpenMP team, and with more OpenMP threads than cores libgomp
        # barely spin-waits, which made every later decode step slower (64x16 samples: 0.10 s
        # instead of 0.07 s)
        spec = SampleSpec(tuple(generator.encode("好")), SamplingParams(max_new_tokens=2), seed=0)
        service.batcher.submit([spec])

    try:
        return serve("Generator", args, lambda server: pb_grpc.add_GeneratorServicer_to_server(service, server),
                     warm_up, draining)
    finally:
        # after the grace period: stop generating before the interpreter exits (exit 0, never an abort)
        service.batcher.close(timeout=args.grace_seconds)
