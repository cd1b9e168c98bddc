"""Typed PPO option flags (generated from PPOConfig) and the Step fields the trainer service reads."""
import argparse
import json
import subprocess
import sys
from dataclasses import fields
from types import SimpleNamespace

import grpc
import pytest

from haoping.client import TrainerClient
from haoping.ppo_config import PPOConfig
from haoping.v1 import haoping_pb2 as pb
from services.coordinator import run as coordinator
from services.coordinator.run import start_service, stop_services
from services.trainer import server as trainer_server


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    coordinator.add_run_flags(parser)
    return parser


def test_every_ppo_option_is_a_flag_with_its_help_in_both_commands():
    trainer_help = trainer_server.build_parser().format_help()
    run_help = run_parser().format_help()
    for f in fields(PPOConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in trainer_help, flag
        assert f.metadata["help"], f.name
        if f.name not in coordinator.RUN_SET_OPTIONS:  # the run's --seed and --min-new-tokens set those
            assert flag in run_help, flag
    assert "{ppo,grpo,rloo}" in trainer_help and "{ppo,grpo,rloo}" in run_help


def test_cli_help_lists_the_options():
    result = subprocess.run([sys.executable, "-m", "services.cli", "run", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--algorithm" in result.stdout and "--kl-target" in result.stdout


@pytest.mark.parametrize("argv,message", [(["--algorithm", "dpo"], "invalid choice"),
                                          (["--learning-rate", "fast"], "invalid float"),
                                          (["--ppo-epochs", "1.5"], "invalid int")])
def test_bad_option_values_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer_server.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and message in err


def test_typed_flags_override_the_json_and_only_given_flags_count(monkeypatch):
    args = trainer_server.build_parser().parse_args(
        ["--ppo-config", json.dumps({"learning_rate": 0.5, "ppo_epochs": 2}), "--learning-rate", "0.1",
         "--algorithm", "grpo", "--reward-clip", "none", "--no-adaptive-kl"])
    options = trainer_server.ppo_options(args)
    assert options == {"learning_rate": 0.1, "ppo_epochs": 2, "algorithm": "grpo", "reward_clip": None,
                       "adaptive_kl": False}
    config = PPOConfig.from_dict(options)
    assert config.ppo_epochs == 2 and config.init_kl_coef == 0.03  # the grpo preset fills the rest
    assert trainer_server.ppo_options(trainer_server.build_parser().parse_args([])) == {}
    monkeypatch.setenv("HAOPING_ALGORITHM", "rloo")
    monkeypatch.setenv("HAOPING_ADAPTIVE_KL", "false")
    assert trainer_server.ppo_options(trainer_server.build_parser().parse_args([])) == {
        "algorithm": "rloo", "adaptive_kl": False}


def test_run_passes_the_options_seed_and_eos_minimum_to_the_trainer():
    args = run_parser().parse_args(["--algorithm", "grpo", "--kl-target", "4", "--seed", "7", "--min-new-tokens", "3",
                                    "--ppo-config", '{"learning_rate": 0.002}', "--scorer-normalize", "sigmoid"])
    assert coordinator.trainer_ppo_config(args) == {
        "learning_rate": 0.002, "algorithm": "grpo", "kl_target": 4.0, "seed": 7, "min_response_tokens": 3,
        "reward_normalization": "sigmoid"}
    with_running = run_parser().parse_args(["--algorithm", "grpo", "--trainer-address", "a:1",
                                            "--generator-addresses", "b:2", "--scorer-address", "c:3"])
    with pytest.raises(ValueError, match="--algorithm"):
        coordinator.running_services(with_running)


@pytest.fixture(scope="module")
def strict_trainer(tiny_policy, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trainer")
    (run_dir / "logs").mkdir()
    services = []
    try:
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu", "--algorithm",
                                                  "grpo", "--stale-rollouts", "reject", "--min-response-tokens", "0"],
                                      run_dir, timeout=120))
        yield SimpleNamespace(address=services[0].address, token_file=services[0].token_file)
    finally:
        stop_services(services)


def rollout(query, response, reward=0.5, version=0):
    return pb.Rollout(query_token_ids=query, response_token_ids=response, reward=reward, policy_version=version)


def test_step_request_carries_the_eos_minimum(strict_trainer, tiny_policy):
    from haoping.models import TokenFormat, load_tokenizer

    eos = TokenFormat.of(load_tokenizer(str(tiny_policy))).eos_id
    with TrainerClient(strict_trainer.address, token_file=strict_trainer.token_file) as trainer:
        version = trainer.stub.GetInfo(pb.GetInfoRequest(), timeout=30).policy_version
        early_eos = [rollout([2, 10], [11, eos], version=version), rollout([2, 10], [12, 13], version=version)]
        with pytest.raises(grpc.RpcError) as err:
            trainer.step(early_eos, min_new_tokens=3)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_response_tokens=3" in err.value.details()
        step = trainer.step(early_eos, min_new_tokens=1)  # the EOS comes after one token: fine
        assert step.policy_version == version + 1
        assert "ppo/loss/value" not in step.stats  # grpo: no value head


def test_stale_rollouts_are_refused_with_failed_precondition(strict_trainer):
    with TrainerClient(strict_trainer.address, token_file=strict_trainer.token_file) as trainer:
        version = trainer.stub.GetInfo(pb.GetInfoRequest(), timeout=30).policy_version
        stale = [rollout([2, 10], [11, 12], version=version), rollout([2, 10], [12, 13], version=version + 5)]
        with pytest.raises(grpc.RpcError) as err:
            trainer.step(stale)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rollout 1 comes from policy version" in err.value.details()
        assert trainer.stub.GetInfo(pb.GetInfoRequest(), timeout=30).policy_version == version


def test_a_local_weights_dir_the_trainer_cannot_write_exits_2_before_anything_loads(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        trainer_server.main(["--insecure-no-auth", "--local-weights-dir", str(not_a_folder)])
    assert exit_info.value.code == 2
    assert f"--local-weights-dir {not_a_folder}" in capsys.readouterr().err
