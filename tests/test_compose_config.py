"""The compose stack's files agree with the code: ports, health checks, scrape targets, dashboard
metric names; and the coordinator's flags for running against already-running services."""
import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from services.common.metrics import SERVICE_COLLECTORS
from services.coordinator.run import add_run_flags, running_services
from services.generator.server import build_parser as generator_parser
from services.scorer.server import build_parser as scorer_parser
from services.trainer.server import build_parser as trainer_parser

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"generator": generator_parser, "scorer": scorer_parser, "trainer": trainer_parser}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _defaults(service: str) -> argparse.Namespace:
    return PARSERS[service]().parse_args([])


def test_compose_publishes_and_health_checks_each_services_default_ports():
    compose = _compose()["services"]
    for name in PARSERS:
        defaults = _defaults(name)
        service = compose[name]
        assert service["command"] == ["serve", name]
        assert service["environment"]["HAOPING_HOST"] == "0.0.0.0"  # reachable from the other containers
        assert f"127.0.0.1:{defaults.port}:{defaults.port}" in service["ports"]
        assert f"127.0.0.1:{defaults.metrics_port}:{defaults.metrics_port}" in service["ports"]
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{defaults.port}"
    scorer = _defaults("scorer")
    assert f"127.0.0.1:{scorer.human_port}:{scorer.human_port}" in compose["scorer"]["ports"]
    assert compose["scorer"]["environment"]["HAOPING_HUMAN_HOST"] == "0.0.0.0"
    coordinator = compose["coordinator"]["environment"]
    assert coordinator["HAOPING_TRAINER_ADDRESS"] == f"trainer:{_defaults('trainer').port}"
    assert coordinator["HAOPING_GENERATOR_ADDRESSES"] == f"generator:{_defaults('generator').port}"
    assert coordinator["HAOPING_SCORER_ADDRESS"] == f"scorer:{_defaults('scorer').port}"
    assert compose["generator"]["environment"]["HAOPING_TRAINER_ADDRESS"] == coordinator["HAOPING_TRAINER_ADDRESS"]


def _label_defaults() -> argparse.Namespace:
    from services.labeler.cli import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    return parser.parse_args(["label"])


def test_compose_runs_the_labeling_page_on_the_generator_service():
    compose = _compose()["services"]
    labeler, label = compose["labeler"], _label_defaults()
    assert labeler["command"] == ["label"]
    assert labeler["image"] == compose["generator"]["image"] == "haoping:latest"  # the one haoping image
    env = labeler["environment"]
    assert env["HAOPING_HOST"] == "0.0.0.0"
    assert env["HAOPING_GENERATOR"] == f"generator:{_defaults('generator').port}"
    assert labeler["ports"] == [f"127.0.0.1:{label.port}:{label.port}"]  # published on loopback only
    assert f"http://127.0.0.1:{label.port}/healthz" in labeler["healthcheck"]["test"][-1]
    assert labeler["depends_on"]["generator"]["condition"] == "service_healthy"
    volume = env["HAOPING_OUT"].rsplit("/", 1)[0]
    assert any(v.endswith(":" + volume) for v in labeler["volumes"])  # the lists outlive the container
    assert set(v.split(":")[0] for v in labeler["volumes"]) <= set(_compose()["volumes"])


def test_every_service_and_the_coordinator_take_the_token_from_the_compose_secret():
    config = _compose()
    assert "file" in config["secrets"]["auth_token"]
    for name in (*PARSERS, "coordinator"):
        service = config["services"][name]
        assert service["secrets"] == ["auth_token"], name
        assert service["environment"]["HAOPING_AUTH_TOKEN_FILE"] == "/run/secrets/auth_token", name


def test_prometheus_scrapes_every_services_metrics_port():
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{_defaults(name).metrics_port}" for name in PARSERS}
    for job in config["scrape_configs"]:  # one job per service, named after it
        assert [t.split(":")[0] for group in job["static_configs"] for t in group["targets"]] == [job["job_name"]]


@pytest.mark.skipif(not shutil.which("promtool") and not os.environ.get("HAOPING_REQUIRE_PROMTOOL"),
                    reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_prometheus_config():
    done = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_only_metrics_the_services_export():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/haoping.json").read_text())
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    shared = {family.name for family in REGISTRY.collect()}  # what every service exports
    owner = {collector._name: service for service, collectors in SERVICE_COLLECTORS.items()
             for collector in collectors}
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        for name, selector in re.findall(r"(haoping_[a-z_]+)(\{[^}]*\})?", expr):
            family = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert family in shared or family in owner, (name, expr)
            # selected by job: a service's own metric from that service's job only
            expected = f'job="{owner[family]}"' if family in owner else 'job=~"generator|scorer|trainer"'
            assert expected in selector, (name, expr)
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {datasource["datasources"][0]["uid"]}


def _run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return parser.parse_args(list(argv))


def test_coordinator_uses_running_services_only_with_all_three_addresses():
    assert running_services(_run_args()) is None  # starts its own services
    both = _run_args("--trainer-address", "t:1", "--generator-addresses", "g:1, g2:1", "--scorer-address", "s:1")
    trainer, generators, scorers = running_services(both)
    assert (trainer, [g.text for g in generators], [s.text for s in scorers]) == ("t:1", ["g:1", "g2:1"], ["s:1"])
    with pytest.raises(ValueError, match="go together"):
        running_services(_run_args("--trainer-address", "t:1"))
    with pytest.raises(ValueError, match="--ppo-config"):
        running_services(_run_args("--trainer-address", "t:1", "--generator-addresses", "g:1",
                                   "--scorer-address", "s:1", "--ppo-config", '{"learning_rate": 1e-4}'))


def test_a_bad_set_of_service_addresses_exits_2_before_any_run_dir_is_written(tmp_path, capsys):
    from services.coordinator.run import run

    assert run(_run_args("--runs-dir", str(tmp_path), "--name", "x", "--trainer-address", "t:1")) == 2
    assert "go together" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run dir, and runs/latest still points where it did
