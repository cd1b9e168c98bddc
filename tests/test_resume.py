"""Continuing a run: its saved settings (a differing flag refused), cycles.jsonl holding each
index once, --fresh names, and the restart budget."""
import argparse
import json

import pytest

from services.coordinator.rundir import ConfigMismatch, CycleLog, fresh_name, resumed_settings, save_config
from services.coordinator.run import add_run_flags, build_parser_defaults
from services.coordinator.supervisor import RestartBudgetExceeded, Supervisor


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return parser.parse_args(list(argv))


def test_a_continued_run_keeps_its_settings_and_refuses_a_differing_flag(tmp_path):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    save_config(run_dir, _args("--name", "x", "--seed", "3", "--ppo-config", '{"learning_rate": 5e-4}'))
    defaults = vars(build_parser_defaults())
    # flags not given take the saved values; --cycles may change
    merged = resumed_settings(run_dir, _args("--name", "x", "--cycles", "80"), defaults)
    assert merged["seed"] == 3 and merged["ppo_config"] == '{"learning_rate": 5e-4}' and merged["cycles"] == 80
    with pytest.raises(ConfigMismatch, match="--ppo-config"):
        resumed_settings(run_dir, _args("--name", "x", "--ppo-config", '{"learning_rate": 1e-3}'), defaults)
    with pytest.raises(ConfigMismatch, match="--seed 4"):
        resumed_settings(run_dir, _args("--name", "x", "--seed", "4"), defaults)
    # the same value given again is fine
    assert resumed_settings(run_dir, _args("--name", "x", "--seed", "3"), defaults)["seed"] == 3


def test_rewinding_keeps_each_cycle_once_and_moves_the_rest_aside(tmp_path):
    log = CycleLog(tmp_path)
    for index in [0, 1, 2, 3, 4]:
        log.append({"cycle": index, "reward_mean": index / 10})
    with open(log.path, "a") as f:
        f.write('{"cycle": 5, "rew')  # cut short by a kill -9
    assert [r["cycle"] for r in log.records()] == [0, 1, 2, 3, 4]
    assert log.rewind(3) == 3
    assert [r["cycle"] for r in log.records()] == [0, 1, 2]
    moved = log.superseded.read_text().splitlines()
    assert [json.loads(line)["cycle"] for line in moved[:2]] == [3, 4] and moved[2] == '{"cycle": 5, "rew'
    log.append({"cycle": 3})
    assert log.rewind(4) == 0 and [r["cycle"] for r in log.records()] == [0, 1, 2, 3]


def test_fresh_names_never_reuse_a_run(tmp_path):
    assert fresh_name(tmp_path, "x") == "x"
    (tmp_path / "x").mkdir()
    (tmp_path / "x-2").mkdir()
    assert fresh_name(tmp_path, "x") == "x-3"


class _Dead:
    returncode = -9
    pid = 1

    def poll(self):
        return -9


class _Service:
    def __init__(self, name):
        self.name, self.process, self.log_path, self.address = name, _Dead(), "log", "a:1"


def test_restarts_are_bounded_per_service_per_hour():
    now = [0.0]
    supervisor = Supervisor([_Service("trainer")], launch=lambda dead: _Service(dead.name), wait=lambda s: s,
                            max_per_hour=2, clock=lambda: now[0])
    assert supervisor.restart_dead() == ["trainer"]
    now[0] = 100
    assert supervisor.restart_dead() == ["trainer"]
    with pytest.raises(RestartBudgetExceeded, match="3 times within an hour"):
        supervisor.restart_dead()
    now[0] = 3700  # the first restart left the window
    assert supervisor.restart_dead() == ["trainer"] and supervisor.restarts["trainer"] == 3
