"""Trainer service: a thin gRPC adapter over :class:`haoping.ppo_trainer.PPOTrainer`."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import re
import sys
import threading
from dataclasses import dataclass, fields

import grpc

from haoping.checkpoint import CheckpointError, CheckpointStore, check_label
from haoping.distributed import (BACKENDS, DataParallel, LeaderCalls, ProcessGroupFailed, follow_leader,
                                 launched_world_size, torchrun_args, without_flags)
from haoping.log import get_logger, setup_logging
from haoping.models import parse_dtype, pick_device
from haoping.ppo_trainer import NonFiniteStep, PPOConfig, PPOTrainer, StaleRolloutsError
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from haoping.weight_files import new_tag, publish_weight_file
from services.common import metrics
from services.common.config import add_common_server_flags, add_dataclass_flags, add_flag, dataclass_flag_values
from services.common.security import check_security_flags
from services.common.server import ComputeThread, Draining, configure_torch, exit_with_parent, serve
from services.trainer.weight_group import TrainerWeightGroups, add_weight_group_flags

log = get_logger(__name__)
CHUNK_BYTES = 1 << 20  # well under any sane gRPC message limit
STEP_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class TrainerService(pb_grpc.TrainerServicer):
    def __init__(self, trainer: PPOTrainer, args, draining: Draining, calls: LeaderCalls | None = None,
                 compute: ComputeThread | None = None):
        self.trainer = trainer
        # every model op on one thread (the one that built the trainer), whichever thread took the call
        self.compute = compute or ComputeThread("trainer-compute")
        # what changes the trainer: the trainer itself, or, with several processes, rank 0's
        # calls that every other process takes part in
        self.calls = calls or trainer
        self.draining = draining
        self.checkpoints = CheckpointStore(args.checkpoint_dir, args.keep_checkpoints) if args.checkpoint_dir else None
        self.checkpoint_every = args.checkpoint_every
        self.max_coordinator_state_bytes = args.max_coordinator_state_bytes
        self.device, self.dtype = args.device, args.dtype
        self._lock = threading.Lock()  # one update at a time; weights are read between updates
        self.local_weights_dir = args.local_weights_dir
        self.weight_file_tag = new_tag()
        config = trainer.model.lm.config
        self.limits = StepLimits(max_rollouts=args.max_rollouts, max_step_tokens=args.max_step_tokens,
                                 max_abs_reward=args.max_abs_reward, vocab_size=config.vocab_size,
                                 max_context=model_context(config))
        metrics.POLICY_VERSION.labels("trainer").set(trainer.version)
        self.weight_groups = TrainerWeightGroups(trainer, self._lock, args, self.compute)

    def Step(self, request, context):
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "trainer is draining")
        problem = check_step_request(request, self.limits)
        if problem is not None:
            context.abort(*problem)
        rollouts = request.rollouts
        queries = [list(r.query_token_ids) for r in rollouts]
        responses = [list(r.response_token_ids) for r in rollouts]
        rewards = [r.reward for r in rollouts]
        if request.step_id and not STEP_ID.fullmatch(request.step_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "step_id must match [A-Za-z0-9._:-]{1,128}")
        with self._lock:
            min_tokens = request.min_new_tokens if request.HasField("min_new_tokens") else None
            stats, version, repeated = self._apply(request.step_id, queries, responses, rewards, context, min_tokens,
                                                   [r.policy_version for r in rollouts])
            if not repeated and self.checkpoints and self.checkpoint_every and version % self.checkpoint_every == 0:
                try:
                    self._save(f"step-{self.trainer.steps_done:06d}", b"")
                except ProcessGroupFailed as err:
                    process_group_failed(err, context)
        if repeated:
            metrics.TRAINER_REPEATED_STEPS.inc()
            log.info("Step %s was applied before: answering with its stored response", request.step_id)
        else:
            record_step_metrics(stats, version)
        return pb.StepResponse(policy_version=version, stats=stats, repeated=repeated)

    def _apply(self, step_id, queries, responses, rewards, context, *step_args):
        try:
            return self.compute.run(self.calls.apply_step, step_id, queries, responses, rewards, *step_args)
        except StaleRolloutsError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except ProcessGroupFailed as err:
            process_group_failed(err, context)
        except NonFiniteStep as err:
            metrics.TRAINER_NON_FINITE_STEPS.inc()
            log.error("Step %s: %s; the trainer state is unchanged at version %d", step_id or "(no id)", err,
                      self.trainer.version)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"non-finite update: {err}")

    def _save(self, label: str, coordinator_state: bytes):
        path = self.compute.run(self.calls.save_checkpoint, self.checkpoints.path_of(label),
                                {"coordinator_state.json": coordinator_state} if coordinator_state else None)
        metrics.CHECKPOINTS_SAVED.inc()
        removed = self.checkpoints.prune()
        log.info("checkpoint %s saved (policy version %d)%s", path, self.trainer.version,
                 f"; removed {', '.join(p.name for p in removed)}" if removed else "")
        return path

    def GetWeights(self, request, context):
        if request.as_local_file:
            yield self._weight_file(request, context)
            return
        with self._lock:
            version, data, sha = self.compute.run(self.trainer.policy_weights)
        self._check_version(request, version, context)
        metrics.WEIGHT_BYTES.labels("sent").inc(len(data))
        for offset in range(0, max(1, len(data)), CHUNK_BYTES):
            yield pb.WeightsChunk(policy_version=version, offset=offset, total_bytes=len(data),
                                  data=data[offset:offset + CHUNK_BYTES], sha256=sha)

    def _weight_file(self, request, context) -> pb.WeightsChunk:
        """The policy written into --local-weights-dir (once per version), announced by one chunk."""
        if not self.local_weights_dir:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "as_local_file: the trainer was started without --local-weights-dir")
        with self._lock:  # no Step changes the weights while they are written
            version = self.trainer.version
            self._check_version(request, version, context)
            try:
                path = publish_weight_file(self.local_weights_dir, version, self.weight_file_tag,
                                           lambda tmp: self.compute.run(self.trainer.write_policy_file, tmp))
                size = path.stat().st_size
            except OSError as err:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot write the weight file: {err}")
        metrics.WEIGHT_BYTES.labels("filed").inc(size)
        return pb.WeightsChunk(policy_version=version, total_bytes=size, file_tag=self.weight_file_tag)

    @staticmethod
    def _check_version(request, version: int, context) -> None:
        if request.version and request.version != version:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"policy version {request.version} is not available; the trainer holds {version}")

    def SaveCheckpoint(self, request, context):
        if request.directory:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "directory: paths are not accepted; name a label, written inside --checkpoint-dir")
        try:
            label = check_label(request.label)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if len(request.coordinator_state) > self.max_coordinator_state_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"coordinator_state: {len(request.coordinator_state)} bytes, at most "
                          f"{self.max_coordinator_state_bytes} (--max-coordinator-state-bytes)")
        if self.checkpoints is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the trainer was started without --checkpoint-dir")
        with self._lock:
            try:
                path = self._save(label, request.coordinator_state)
            except ProcessGroupFailed as err:
                process_group_failed(err, context)
            except (OSError, CheckpointError) as err:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot write checkpoint {label}: {err}")
            return pb.SaveCheckpointResponse(directory=str(path), policy_version=self.trainer.version, label=label,
                                             steps_done=self.trainer.steps_done)

    def OpenWeightGroup(self, request, context):
        return self.weight_groups.open(request, context)

    def JoinWeightGroup(self, request, context):
        return self.weight_groups.join(request, context)

    def BroadcastWeights(self, request, context):
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "trainer is draining")
        return self.weight_groups.broadcast(request, context)

    def GetInfo(self, request, context):
        t = self.trainer
        return pb.ServiceInfo(service="trainer", model_id=t.policy_ref, policy_version=t.version,
                              dtype=self.dtype, device=self.device,
                              max_context=self.limits.max_context,
                              limits={"minibatch_size": t.config.minibatch_size, "ppo_epochs": t.config.ppo_epochs,
                                      "max_rollouts": self.limits.max_rollouts,
                                      "max_step_tokens": self.limits.max_step_tokens,
                                      "max_abs_reward": int(self.limits.max_abs_reward),
                                      "max_coordinator_state_bytes": self.max_coordinator_state_bytes,
                                      "trainer_processes": t.parallel.world if t.parallel else 1,
                                      "trainer_fsdp": int(t.fsdp),
                                      "local_weight_files": int(bool(self.local_weights_dir)),
                                      **self.weight_groups.limits})


def process_group_failed(err: Exception, context) -> None:
    """Another trainer process is gone mid-call: this group can never update again. Exit, as a
    one-process trainer killed mid-Step would, so that the coordinator restarts the trainer from
    its newest checkpoint; the caller gets UNAVAILABLE."""
    log.error("a trainer process failed (%s); exiting", str(err).splitlines()[0])
    threading.Timer(0.5, os._exit, (1,)).start()
    context.abort(grpc.StatusCode.UNAVAILABLE, "a trainer process failed; the trainer is restarting")


@dataclass(frozen=True)
class StepLimits:
    max_rollouts: int
    max_step_tokens: int
    max_abs_reward: float
    vocab_size: int
    max_context: int


def model_context(config) -> int:
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)


def check_step_request(request: pb.StepRequest, limits: StepLimits) -> tuple[grpc.StatusCode, str] | None:
    """The first reason to refuse a Step, as (status, message naming the field), or None.

    Sizes are read from the message as parsed, before anything is copied or allocated: a request
    over a budget costs the trainer nothing but the parse."""
    rollouts = request.rollouts
    if not rollouts:
        return grpc.StatusCode.INVALID_ARGUMENT, "rollouts must not be empty"
    if len(rollouts) > limits.max_rollouts:
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(rollouts)} rollouts in one Step; at most {limits.max_rollouts} (--max-rollouts)")
    total = 0
    for i, rollout in enumerate(rollouts):
        q, r = len(rollout.query_token_ids), len(rollout.response_token_ids)
        total += q + r
        if total > limits.max_step_tokens:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rollouts hold more than {limits.max_step_tokens} tokens in all (--max-step-tokens), "
                    f"passed at rollout {i}")
        if not q or not r:
            return grpc.StatusCode.INVALID_ARGUMENT, f"rollout {i}: empty {'query' if not q else 'response'}_token_ids"
        if limits.max_context and q + r > limits.max_context:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"rollout {i}: {q} query + {r} response tokens exceed the model context of {limits.max_context}")
        if not math.isfinite(rollout.reward) or abs(rollout.reward) > limits.max_abs_reward:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"rollout {i}: reward {rollout.reward} must be finite and within +-{limits.max_abs_reward:g} "
                    "(--max-abs-reward)")
    for i, rollout in enumerate(rollouts):  # after the size checks: this pass touches every id
        for field in ("query_token_ids", "response_token_ids"):
            ids = getattr(rollout, field)
            if min(ids) < 0 or max(ids) >= limits.vocab_size:
                return (grpc.StatusCode.INVALID_ARGUMENT,
                        f"rollout {i}: {field} has a token id outside the vocabulary [0, {limits.vocab_size})")
    return None


def record_step_metrics(stats: dict[str, float], version: int) -> None:
    for name, value in stats.items():
        metrics.TRAINER_STAT.labels(name).set(value)
    metrics.TRAINER_REWARD_MEAN.set(stats["env/reward_mean"])
    metrics.TRAINER_KL.set(stats["objective/kl"])
    metrics.TRAINER_KL_COEF.set(stats["objective/kl_coef"])
    metrics.TRAINER_POLICY_LOSS.set(stats["ppo/loss/policy"])
    if "ppo/loss/value" in stats:  # critic-free algorithms have no value loss
        metrics.TRAINER_VALUE_LOSS.set(stats["ppo/loss/value"])
    metrics.TRAINER_STEPS.inc()
    metrics.TRAINER_STEP_DURATION.observe(stats["time/ppo/total"])
    metrics.POLICY_VERSION.labels("trainer").set(version)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haoping serve trainer", description=__doc__)
    add_common_server_flags(parser, port=50053, metrics_port=9103)
    add_flag(parser, "--model", "starter:policy", help="initial policy and reference model")
    add_flag(parser, "--resume", "",
             help="checkpoint directory to resume from, or 'latest': the newest good one in --checkpoint-dir "
                  "(none yet: start from --model)")
    add_flag(parser, "--checkpoint-dir", "", help="the only folder SaveCheckpoint and periodic checkpoints write in")
    add_flag(parser, "--checkpoint-every", 0, int, "checkpoint every N steps (0: only on request)")
    add_flag(parser, "--keep-checkpoints", 3, int, "newest verified checkpoints kept in --checkpoint-dir")
    add_flag(parser, "--local-weights-dir", "",
             help="folder shared with co-located generators: GetWeights(as_local_file) writes the policy there "
                  "once per version (the newest 2 kept) instead of streaming it (docs/weight_sync.md)")
    add_flag(parser, "--max-coordinator-state-bytes", 1 << 20, int, "largest SaveCheckpoint coordinator_state")
    add_flag(parser, "--max-rollouts", 2048, int, "most rollouts in one Step (RESOURCE_EXHAUSTED beyond)")
    add_flag(parser, "--max-step-tokens", 262144, int,
             "most query + response tokens over all rollouts of one Step (RESOURCE_EXHAUSTED beyond)")
    add_flag(parser, "--max-abs-reward", 100.0, float, "largest |reward| a rollout may carry (INVALID_ARGUMENT beyond)")
    add_flag(parser, "--nproc", 1, int, "trainer processes on this node (data parallel under torchrun; rank 0 "
             "serves gRPC)")
    add_flag(parser, "--nnodes", 1, int, "nodes the trainer's processes span (each node starts its own --nproc)")
    add_flag(parser, "--node-rank", 0, int, "this node's index among --nnodes (node 0 serves gRPC)")
    add_flag(parser, "--rdzv-endpoint", "", help="host:port where node 0 meets the others (torch.distributed "
             "static rendezvous; needed with --nnodes > 1; default with one node: a free local port)")
    add_flag(parser, "--dist-backend", "auto", help="torch.distributed backend: auto (nccl on CUDA, gloo "
             "otherwise), gloo or nccl", choices=BACKENDS)
    add_flag(parser, "--dist-timeout", 600.0, float, "seconds a collective may wait for the other processes")
    add_flag(parser, "--fsdp", False, bool, "with several processes: shard the policy, value head, reference model, "
             "gradients and optimizer state over them (FSDP2 fully_shard) instead of a whole copy in each")
    add_flag(parser, "--ppo-config", "", help="JSON object of PPO options (see PPOConfig), e.g. "
             "'{\"minibatch_size\": 16}'; a typed option flag below overrides its key")
    add_weight_group_flags(parser)
    add_dataclass_flags(parser, PPOConfig, group_title="PPO options (PPOConfig)")
    return parser


PPO_OPTION_NAMES = [f.name for f in fields(PPOConfig)]


def ppo_options(args) -> dict:
    """--ppo-config's JSON object, then every typed PPO option flag that was given."""
    values = json.loads(args.ppo_config) if args.ppo_config else {}
    if not isinstance(values, dict):
        raise ValueError("--ppo-config must be a JSON object")
    values.update(dataclass_flag_values(args, PPO_OPTION_NAMES))
    return values


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_security_flags(parser, args)
    if args.local_weights_dir:  # refused now, not at the first GetWeights
        try:
            os.makedirs(args.local_weights_dir, mode=0o700, exist_ok=True)
            if not os.access(args.local_weights_dir, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as err:
            parser.error(f"--local-weights-dir {args.local_weights_dir}: {err}")
    configure_torch(args)
    world = launched_world_size()
    if "RANK" not in os.environ and (args.nproc > 1 or args.nnodes > 1):
        return launch_processes(args, argv)
    try:
        options = ppo_options(args)
        config = PPOConfig.from_dict(options)
    except (ValueError, TypeError) as err:
        print(f"error: PPO options: {err}", file=sys.stderr)
        return 2
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    resume = args.resume
    try:
        parallel = DataParallel.from_env(args.dist_backend, device, args.dist_timeout) if world > 1 else None
    except ValueError as err:  # e.g. --dist-backend nccl without CUDA
        print(f"error: --dist-backend: {err}", file=sys.stderr)
        return 2
    if parallel is not None:
        device = parallel.device  # cuda:LOCAL_RANK on GPUs
    elif args.fsdp:
        log.warning("--fsdp with one trainer process: nothing to shard; the trainer runs unsharded")
    try:
        if resume == "latest":
            if not args.checkpoint_dir:
                raise SystemExit("--resume latest needs --checkpoint-dir")
            # only rank 0 looks (a refused checkpoint is moved aside); the others load its choice
            if parallel is None or parallel.is_leader:
                resume = CheckpointStore(args.checkpoint_dir, args.keep_checkpoints).newest_good()
            if parallel is not None:
                resume = parallel.broadcast_json(str(resume) if resume else "")
        compute = ComputeThread("trainer-compute")

        def build() -> PPOTrainer:
            if not resume:
                return PPOTrainer(args.model, config, device, dtype, parallel=parallel, fsdp=args.fsdp)
            try:
                resumed = PPOTrainer.from_checkpoint(resume, device, dtype, config if options else None, parallel,
                                                     fsdp=args.fsdp)
            except (CheckpointError, FileNotFoundError) as err:
                raise SystemExit(f"--resume: {err}")
            log.info("resumed from %s at policy version %d (%d steps applied)", resume, resumed.version,
                     resumed.steps_done)
            return resumed

        trainer = compute.run(build)  # built where every later model op runs
        if parallel is not None and not parallel.is_leader:
            log.info("trainer rank %d of %d: following rank 0", parallel.rank, parallel.world)
            # torchrun hands SIGTERM to every process; rank 0 drains (its Step needs this one) and
            # then says stop, or this process ends with its parent
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            exit_with_parent()
            compute.run(follow_leader, trainer, parallel)
            return 0
        calls = LeaderCalls(trainer, parallel) if parallel is not None else None
        draining = Draining()
        service = TrainerService(trainer, args, draining, calls, compute)
        try:
            return serve("Trainer", args, lambda server: pb_grpc.add_TrainerServicer_to_server(service, server),
                         lambda: compute.run(trainer.policy_weights), draining)
        finally:
            if calls is not None:
                try:
                    compute.run(calls.stop)
                except ProcessGroupFailed as err:  # the others are gone already
                    log.warning("trainer processes: %s", err)
    finally:
        if parallel is not None:
            parallel.close()


def launch_processes(args, argv: list[str]) -> int:
    """Start this node's --nproc trainer processes under torchrun (torch.distributed.run) and wait
    for them. They inherit this process as the parent they exit with; this one exits with the
    coordinator that started it, if any."""
    import torch.distributed.run

    try:
        command = torchrun_args("services.trainer", without_flags(argv), args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    exit_with_parent()
    os.environ["HAOPING_PARENT_PID"] = str(os.getpid())
    log.info("starting %d trainer processes: torchrun %s", args.nproc, " ".join(command))
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        torch.distributed.run.main(command)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 1
    except SignalException as err:  # SIGTERM/SIGINT: torchrun passed it on and waited for the processes
        log.info("trainer processes stopped (%s)", err)
        return 0
    except Exception as err:  # torchrun's ChildFailedError names the process and its exit code
        lines = [line for line in str(err).splitlines() if line.strip()]
        log.error("trainer processes failed: %s", " ".join(lines[:4]) if lines else type(err).__name__)
        return 1
    return 0
