"""The Prometheus alert rules in deploy/: valid, and each one fires (and stays quiet) on synthetic
series as deploy/alerts_test.yml expects. promtool is Debian's `prometheus` package."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("HAOPING_REQUIRE_PROMTOOL"):
            pytest.fail("promtool not found: apt-get install prometheus (CI installs it)")
        pytest.skip("promtool not installed (Debian package prometheus); CI requires it")
    return found


def test_the_alert_rules_are_valid():
    done = subprocess.run([_promtool(), "check", "rules", str(DEPLOY / "alerts.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 rules found" in done.stdout


def test_the_alert_rules_fire_on_synthetic_series():
    done = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=DEPLOY, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_prometheus_loads_the_rules():
    assert "alerts.yml" in (DEPLOY / "prometheus.yml").read_text()
    compose = (DEPLOY.parent / "docker-compose.yml").read_text()
    assert "./deploy/alerts.yml:/etc/haoping/alerts.yml:ro" in compose
