"""The data-parallel trainer: two gloo processes take the update one takes, statistics and all;
a checkpoint written by two loads in one."""
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
    # minibatches of 4, 4 and 1 rollouts: the last leaves rank 1 no rows; 2 micro-batches each
    "ppo": {"minibatch_size": 4, "gradient_accumulation_steps": 2, "ppo_epochs": 2, "learning_rate": 1e-2,
            "reward_normalization": "running", "init_kl_coef": 0.3, "kl_target": 0.01, "kl_horizon": 50},
    # one minibatch of the whole batch: the fused first forward, per rank on its rows
    "grpo": {"algorithm": "grpo", "learning_rate": 1e-2, "kl_penalty": "loss", "adaptive_kl": True,
             "kl_target": 0.01, "kl_horizon": 50},
}
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compared(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


def _parameters(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _two_process_run(rank: int, world: int, port: int, policy: str, out: str) -> None:
    """STEPS Steps per config at world size 2, a checkpoint, and one more Step; rank 0 records all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from haoping.distributed import DataParallel
    from haoping.ppo_trainer import NonFiniteStep, PPOConfig, PPOTrainer

    parallel = DataParallel.from_env("gloo", torch.device("cpu"), timeout_seconds=120)
    try:
        results = {}
        for name, options in CONFIGS.items():
            trainer = PPOTrainer(policy, PPOConfig.from_dict(options), parallel=parallel)
            stats = [_compared(trainer.step(QUERIES, RESPONSES, SCORES)) for _ in range(STEPS)]
            params = _parameters(trainer)
            trainer.save_checkpoint(Path(out) / f"ckpt-{name}" / "step-3")
            after = _compared(trainer.step(QUERIES, RESPONSES, SCORES))
            if parallel.is_leader:
                save_file(params, Path(out) / f"{name}-params.safetensors")
                save_file(_parameters(trainer), Path(out) / f"{name}-params-after.safetensors")
                results[name] = {"stats": stats, "after": after}
        # an update only rank 1 finds non-finite is rolled back on every rank
        if not parallel.is_leader:
            trainer._non_finite_problem = lambda stats: "non-finite weights in rank 1's copy"
        before = _parameters(trainer)
        try:
            trainer.guarded_step(QUERIES, RESPONSES, SCORES)
            rolled_back = False
        except NonFiniteStep as err:
            rolled_back = str(err)
        if parallel.is_leader:
            results["rollback"] = {"message": rolled_back, "version": trainer.version,
                                   "unchanged": all(torch.equal(v, before[k]) for k, v in _parameters(trainer).items())}
        if parallel.is_leader:
            (Path(out) / "results.json").write_text(json.dumps(results))
    finally:
        parallel.close()


def _assert_close(one: dict, two: dict, what: str) -> None:
    assert one.keys() == two.keys(), what
    for key in one:
        assert abs(one[key] - two[key]) <= 1e-5 * max(1.0, abs(one[key])), f"{what}: {key} {one[key]} vs {two[key]}"


@pytest.fixture(scope="module")
def two_process_results(tiny_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    mp.spawn(_two_process_run, args=(2, free_port(), str(tiny_policy), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_take_the_update_one_takes(tiny_policy, two_process_results, name):
    from haoping.ppo_trainer import PPOConfig, PPOTrainer

    trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict(CONFIGS[name]))
    results = json.loads((two_process_results / "results.json").read_text())[name]
    for i in range(STEPS):
        _assert_close(_compared(trainer.step(QUERIES, RESPONSES, SCORES)), results["stats"][i], f"{name} step {i}")
    assert results["stats"][-1]["objective/kl_coef"] != CONFIGS[name].get("init_kl_coef", 0.03)  # it moved
    two = load_file(two_process_results / f"{name}-params.safetensors")
    for key, value in _parameters(trainer).items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=0), f"{name}: parameter {key}"
    moved = max((value - trainer.ref_model.state_dict()[key[3:]]).abs().max().item()
                for key, value in _parameters(trainer).items() if key.startswith("lm."))
    assert moved > 1e-3  # the update is not a no-op that trivially agrees


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_next_step(two_process_results, name):
    from haoping.ppo_trainer import PPOTrainer

    directory = two_process_results / f"ckpt-{name}" / "step-3"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    sharded = [f for f in manifest["files"] if f.startswith("dcp/")]
    assert "dcp/.metadata" in sharded and len(sharded) >= 3, sharded  # both processes wrote a part
    assert "policy/model.safetensors" in manifest["files"]  # save_pretrained, for generators
    resumed = PPOTrainer.from_checkpoint(directory)
    assert resumed.version == STEPS and resumed.steps_done == STEPS
    results = json.loads((two_process_results / "results.json").read_text())[name]
    _assert_close(_compared(resumed.step(QUERIES, RESPONSES, SCORES)), results["after"], f"{name} resumed")
    two = load_file(two_process_results / f"{name}-params-after.safetensors")
    for key, value in _parameters(resumed).items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=0), f"{name} resumed: parameter {key}"


def test_an_update_one_process_finds_non_finite_is_rolled_back_on_every_process(two_process_results):
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
def test_serve_trainer_with_two_processes_over_grpc(tiny_policy, tmp_path):
    """`haoping serve trainer --nproc 2`: rank 0 answers Steps over gRPC with the statistics of one
    process, a repeated Step id once, a sharded SaveCheckpoint; SIGTERM ends every process."""
    import subprocess

    from haoping.client import TrainerClient
    from haoping.ppo_trainer import PPOConfig, PPOTrainer
    from haoping.v1 import haoping_pb2 as pb
    from services.coordinator.run import start_service, stop_services

    (tmp_path / "logs").mkdir()
    options = {"minibatch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-2}
    service = start_service("trainer", ["--nproc", "2", "--model", str(tiny_policy), "--device", "cpu",
                                        "--ppo-config", json.dumps(options), "--checkpoint-dir",
                                        str(tmp_path / "checkpoints"), "--dist-timeout", "60"],
                            tmp_path, timeout=180)
    rollouts = [pb.Rollout(query_token_ids=q, response_token_ids=r, reward=s)
                for q, r, s in zip(QUERIES, RESPONSES, SCORES)]
    ranks = subprocess.run(["pgrep", "-P", str(service.process.pid)], capture_output=True, text=True).stdout.split()
    try:
        assert len(ranks) == 2  # torchrun's two processes under the launcher
        with TrainerClient(service.address, timeout=120, token=service.token_file.read_text().strip()) as trainer:
            assert trainer.stub.GetInfo(pb.GetInfoRequest(), timeout=30).limits["trainer_processes"] == 2
            first = trainer.step(rollouts, step_id="dp:0")
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
    resumed = PPOTrainer.from_checkpoint(saved.directory)
    assert (Path(saved.directory) / "dcp" / ".metadata").is_file() and resumed.version == 1
    # the gRPC rollouts carried policy version 0: stale at version 1, counted alike
    _assert_close(_compared(resumed.step(QUERIES, RESPONSES, SCORES, policy_versions=[0] * len(QUERIES))),
                  _compared(dict(second.stats)),
                  "Step 2 resumed in one process")
