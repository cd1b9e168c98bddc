"""The data-parallel trainer: two gloo processes take the update one takes, statistics and all,
with whole copies of the model (``dp``) or FSDP2 shards (``fsdp``); a checkpoint written by two
loads in one, and one written by one loads in two sharded processes."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from haoping.distributed import pick_backend, row_shard, torchrun_args, without_flags

# 9 rollouts of 4 prompts (repeated queries take the shared-prefix pass), ragged responses
QUERIES = [[2, 10, 11], [2, 10, 11], [2, 12], [2, 12], [2, 12], [2, 13, 14, 15], [2, 13, 14, 15], [2, 16],
           [2, 16]]
RESPONSES = [[20, 21, 3], [22], [22, 23, 24, 25], [26, 27], [28, 29, 30], [26], [21, 3], [23, 24], [25, 26, 27, 3]]
SCORES = [0.9, 0.1, 0.5, -0.3, 0.7, 0.2, 0.8, -0.6, 0.4]
CONFIGS = {
    # minibatches of 4, 4 and 1 rollouts: the last leaves rank 1 no rows; 2 micro-batches each;
    # rollout forward chunks of 2 rows: rank 0's 5 rows take 3, rank 1's 4 rows 2
    "ppo": {"minibatch_size": 4, "gradient_accumulation_steps": 2, "ppo_epochs": 2, "learning_rate": 1e-2,
            "reward_normalization": "running", "init_kl_coef": 0.3, "kl_target": 0.01, "kl_horizon": 50,
            "forward_batch_size": 2},
    # one minibatch of the whole batch: the fused first forward, per rank on its rows
    "grpo": {"algorithm": "grpo", "learning_rate": 1e-2, "kl_penalty": "loss", "adaptive_kl": True,
             "kl_target": 0.01, "kl_horizon": 50},
}
STEPS = 3
MODES = ("dp", "fsdp")  # whole copies, gradients all-reduced; FSDP2 shards, reduce-scattered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compared(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


def _parameters(trainer) -> dict:
    """Every parameter, whole (under FSDP gathered: every process calls this)."""
    from haoping.distributed import full_tensor

    return {name: full_tensor(p).detach().clone() for name, p in trainer.model.named_parameters()}


def _one_process_run(policy: str, out: Path) -> None:
    """The reference: STEPS Steps per config in one process, a checkpoint, one more Step."""
    from haoping.ppo_trainer import PPOConfig, PPOTrainer

    results = {}
    for name, options in CONFIGS.items():
        trainer = PPOTrainer(policy, PPOConfig.from_dict(options))
        stats = [_compared(trainer.step(QUERIES, RESPONSES, SCORES)) for _ in range(STEPS)]
        save_file(_parameters(trainer), out / f"{name}-params.safetensors")
        trainer.save_checkpoint(out / f"ckpt-{name}" / "step-3")
        results[name] = {"stats": stats, "after": _compared(trainer.step(QUERIES, RESPONSES, SCORES))}
        save_file(_parameters(trainer), out / f"{name}-params-after.safetensors")
        save_file({k: p.detach().clone() for k, p in trainer.ref_model.named_parameters()},
                  out / f"{name}-ref.safetensors")
    (out / "results.json").write_text(json.dumps(results))


def _poison_one_shard_after_the_next_update(trainer) -> None:
    """After the next update, this process's shard of a trained parameter holds a NaN."""
    from haoping.distributed import local_tensor

    step = trainer.step

    def poisoned(*args, **kwargs):
        del trainer.step
        stats = step(*args, **kwargs)
        with torch.no_grad():
            next(local_tensor(p) for p in trainer._trained_parameters() if local_tensor(p).numel()).view(-1)[0] = \
                float("nan")
        return stats
    trainer.step = poisoned


def _two_process_run(rank: int, world: int, port: int, policy: str, out: str, mode: str, one_process: str) -> None:
    """STEPS Steps per config at world size 2, a checkpoint, and one more Step; under FSDP also
    the one-process checkpoint resumed and its next Step; rank 0 records all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from haoping.distributed import DataParallel
    from haoping.ppo_trainer import NonFiniteStep, PPOConfig, PPOTrainer

    parallel = DataParallel.from_env("gloo", torch.device("cpu"), timeout_seconds=120)
    fsdp = mode == "fsdp"
    try:
        results = {}
        for name, options in CONFIGS.items():
            trainer = PPOTrainer(policy, PPOConfig.from_dict(options), parallel=parallel, fsdp=fsdp)
            assert trainer.fsdp == fsdp
            if fsdp:  # each process holds a part of every parameter, the reference model's too
                from torch.distributed.tensor import DTensor

                for model in (trainer.model, trainer.ref_model):
                    params = list(model.parameters())
                    assert all(isinstance(p, DTensor) for p in params)
                    assert sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)
            stats = [_compared(trainer.step(QUERIES, RESPONSES, SCORES)) for _ in range(STEPS)]
            params = _parameters(trainer)
            trainer.save_checkpoint(Path(out) / f"ckpt-{name}" / "step-3")
            after = _compared(trainer.step(QUERIES, RESPONSES, SCORES))
            params_after = _parameters(trainer)
            if parallel.is_leader:
                save_file(params, Path(out) / f"{name}-params.safetensors")
                save_file(params_after, Path(out) / f"{name}-params-after.safetensors")
                # what rank 0 exports (GetWeights, broadcast, save_pretrained): the whole policy
                exported = trainer.policy_state()
                results[name] = {"stats": stats, "after": after, "exported_whole": exported.keys() == {
                    k[3:] for k in params_after if k.startswith("lm.")} and all(
                    torch.equal(v, params_after[f"lm.{k}"]) for k, v in exported.items())}
            if fsdp:  # a one-process checkpoint, resumed in two sharded processes
                resumed = PPOTrainer.from_checkpoint(Path(one_process) / f"ckpt-{name}" / "step-3",
                                                     parallel=parallel, fsdp=True)
                resumed_after = _compared(resumed.step(QUERIES, RESPONSES, SCORES))
                resumed_params = _parameters(resumed)
                if parallel.is_leader:
                    results[name]["resumed_after"] = resumed_after
                    save_file(resumed_params, Path(out) / f"{name}-resumed-params-after.safetensors")
        # an update only rank 1 finds non-finite is rolled back on every rank: under FSDP a NaN
        # in rank 1's own shard, which rank 0 never sees
        if not parallel.is_leader:
            if fsdp:
                _poison_one_shard_after_the_next_update(trainer)
            else:
                trainer._non_finite_problem = lambda stats: "non-finite weights in rank 1's copy"
        before = _parameters(trainer)
        try:
            trainer.guarded_step(QUERIES, RESPONSES, SCORES)
            rolled_back = False
        except NonFiniteStep as err:
            rolled_back = str(err)
        unchanged = all(torch.equal(v, before[k]) for k, v in _parameters(trainer).items())
        if parallel.is_leader:
            results["rollback"] = {"message": rolled_back, "version": trainer.version, "unchanged": unchanged}
        if parallel.is_leader:
            (Path(out) / "results.json").write_text(json.dumps(results))
    finally:
        parallel.close()


def _assert_close(one: dict, two: dict, what: str) -> None:
    assert one.keys() == two.keys(), what
    for key in one:
        assert abs(one[key] - two[key]) <= 1e-5 * max(1.0, abs(one[key])), f"{what}: {key} {one[key]} vs {two[key]}"


@pytest.fixture(scope="module")
def one_process_results(tiny_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _one_process_run(str(tiny_policy), out)
    return out


@pytest.fixture(scope="module", params=MODES)
def two_process_results(request, tiny_policy, one_process_results, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    mp.spawn(_two_process_run, args=(2, free_port(), str(tiny_policy), str(out), request.param,
                                     str(one_process_results)), nprocs=2, join=True)
    return out


def _assert_parameters_close(one: dict, two: dict, what: str) -> None:
    assert one.keys() == two.keys(), what
    for key, value in one.items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=0), f"{what}: parameter {key}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_take_the_update_one_takes(one_process_results, two_process_results, name):
    one = json.loads((one_process_results / "results.json").read_text())[name]
    results = json.loads((two_process_results / "results.json").read_text())[name]
    for i in range(STEPS):
        _assert_close(one["stats"][i], results["stats"][i], f"{name} step {i}")
    assert results["stats"][-1]["objective/kl_coef"] != CONFIGS[name].get("init_kl_coef", 0.03)  # it moved
    one_params = load_file(one_process_results / f"{name}-params.safetensors")
    _assert_parameters_close(one_params, load_file(two_process_results / f"{name}-params.safetensors"), name)
    reference = load_file(one_process_results / f"{name}-ref.safetensors")
    moved = max((value - reference[key[3:]]).abs().max().item()
                for key, value in one_params.items() if key.startswith("lm."))
    assert moved > 1e-3  # the update is not a no-op that trivially agrees
    assert results["exported_whole"]  # rank 0 exports the whole policy, sharded or not


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_one_process_checkpoint_resumes_in_two_fsdp_processes_with_the_same_next_step(
        one_process_results, two_process_results, name):
    if two_process_results.name.startswith("dp"):
        pytest.skip("whole copies load the one-process files as one process does")
    one = json.loads((one_process_results / "results.json").read_text())[name]
    results = json.loads((two_process_results / "results.json").read_text())[name]
    _assert_close(one["after"], results["resumed_after"], f"{name} resumed sharded")
    _assert_parameters_close(load_file(one_process_results / f"{name}-params-after.safetensors"),
                             load_file(two_process_results / f"{name}-resumed-params-after.safetensors"),
                             f"{name} resumed sharded")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_next_step(two_process_results, name):
    from haoping.ppo_trainer import PPOTrainer

    directory = two_process_results / f"ckpt-{name}" / "step-3"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    sharded = [f for f in manifest["files"] if f.startswith("dcp/")]
    assert "dcp/.metadata" in sharded and len(sharded) >= 3, sharded  # both processes wrote a part
    assert "policy/model.safetensors" in manifest["files"]  # save_pretrained, for generators
    exported = load_file(directory / "policy" / "model.safetensors")  # whole tensors, also under FSDP
    params = load_file(two_process_results / f"{name}-params.safetensors")
    assert exported and all(torch.equal(value, params[f"lm.{key}"]) for key, value in exported.items())
    resumed = PPOTrainer.from_checkpoint(directory)
    assert resumed.version == STEPS and resumed.steps_done == STEPS
    results = json.loads((two_process_results / "results.json").read_text())[name]
    _assert_close(_compared(resumed.step(QUERIES, RESPONSES, SCORES)), results["after"], f"{name} resumed")
    two = load_file(two_process_results / f"{name}-params-after.safetensors")
    for key, value in _parameters(resumed).items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=0), f"{name} resumed: parameter {key}"


def test_an_update_one_process_finds_non_finite_is_rolled_back_on_every_process(two_process_results):
    """dp: rank 1 is told its copy is non-finite; fsdp: a NaN lands in rank 1's own shard."""
    rollback = json.loads((two_process_results / "results.json").read_text())["rollback"]
    assert rollback == {"message": "update rolled back: non-finite update in another trainer process",
                        "version": STEPS + 1, "unchanged": True}


def test_row_shards_cover_every_row_once_in_order():
    for n in range(0, 12):
        for world in range(1, 5):
            rows = [i for rank in range(world) for i in range(n)[row_shard(n, rank, world)]]
            assert rows == list(range(n))
            sizes = [len(range(n)[row_shard(n, rank, world)]) for rank in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_torchrun_command_lines_and_backends():
    assert torchrun_args("services.trainer", ["--port", "0"], 2) == [
        "--nproc-per-node", "2", "--max-restarts", "0", "--standalone", "-m", "services.trainer", "--port", "0"]
    multi = torchrun_args("services.trainer", [], 1, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    assert multi[:multi.index("-m")] == ["--nproc-per-node", "1", "--max-restarts", "0", "--nnodes", "2",
                                         "--node-rank", "1", "--rdzv-backend", "static", "--master-addr", "10.0.0.1",
                                         "--master-port", "29400"]
    with pytest.raises(ValueError, match="host:port"):
        torchrun_args("m", [], 1, nnodes=2, node_rank=0)
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_args("m", [], 1, nnodes=2, node_rank=2, rdzv_endpoint="a:1")
    assert without_flags(["--nproc", "2", "--port", "0", "--nnodes=1", "--rdzv-endpoint", "h:1", "--model", "m"]) == [
        "--port", "0", "--model", "m"]
    assert pick_backend("auto", torch.device("cpu")) == "gloo"
    assert pick_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ValueError, match="CUDA"):
        pick_backend("nccl", torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_serve_trainer_with_two_processes_over_grpc(tiny_policy, tmp_path, mode):
    """`haoping serve trainer --nproc 2 [--fsdp]`: rank 0 answers Steps over gRPC with the
    statistics of one process, a repeated Step id once, GetWeights with the whole policy, a
    sharded SaveCheckpoint; SIGTERM ends every process."""
    import subprocess

    from safetensors.torch import load

    from haoping.client import TrainerClient
    from haoping.ppo_trainer import PPOConfig, PPOTrainer
    from haoping.v1 import haoping_pb2 as pb
    from services.coordinator.run import start_service, stop_services

    (tmp_path / "logs").mkdir()
    options = {"minibatch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-2}
    service = start_service("trainer", ["--nproc", "2", "--model", str(tiny_policy), "--device", "cpu",
                                        "--ppo-config", json.dumps(options), "--checkpoint-dir",
                                        str(tmp_path / "checkpoints"), "--dist-timeout", "60",
                                        *(["--fsdp"] if mode == "fsdp" else [])],
                            tmp_path, timeout=180)
    rollouts = [pb.Rollout(query_token_ids=q, response_token_ids=r, reward=s)
                for q, r, s in zip(QUERIES, RESPONSES, SCORES)]
    ranks = subprocess.run(["pgrep", "-P", str(service.process.pid)], capture_output=True, text=True).stdout.split()
    try:
        assert len(ranks) == 2  # torchrun's two processes under the launcher
        with TrainerClient(service.address, timeout=120, token=service.token_file.read_text().strip()) as trainer:
            limits = trainer.stub.GetInfo(pb.GetInfoRequest(), timeout=30).limits
            assert (limits["trainer_processes"], limits["trainer_fsdp"]) == (2, int(mode == "fsdp"))
            first = trainer.step(rollouts, step_id="dp:0")
            pulled = load(b"".join(chunk.data for chunk in trainer.stub.GetWeights(pb.GetWeightsRequest(version=1),
                                                                                  timeout=60)))
            again = trainer.step(rollouts, step_id="dp:0")
            assert (first.policy_version, again.policy_version, again.repeated) == (1, 1, True)
            saved = trainer.save_checkpoint("after-1")
            second = trainer.step(rollouts, step_id="dp:1")
            assert second.policy_version == 2
    finally:
        stop_services([service])
    assert service.process.returncode == 0, service.log_tail()
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    one = PPOTrainer(str(tiny_policy), PPOConfig.from_dict(options))
    _assert_close(_compared(one.step(QUERIES, RESPONSES, SCORES)), _compared(dict(first.stats)), "Step 1 over gRPC")
    _assert_parameters_close(one.policy_state(), pulled, "GetWeights after Step 1")
    resumed = PPOTrainer.from_checkpoint(saved.directory)
    assert (Path(saved.directory) / "dcp" / ".metadata").is_file() and resumed.version == 1
    # the gRPC rollouts carried policy version 0: stale at version 1, counted alike
    _assert_close(_compared(resumed.step(QUERIES, RESPONSES, SCORES, policy_versions=[0] * len(QUERIES))),
                  _compared(dict(second.stats)),
                  "Step 2 resumed in one process")
