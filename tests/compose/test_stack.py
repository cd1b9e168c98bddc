"""The docker compose stack, for real: images built from this tree, tiny models, 127.0.0.1 ports.

Runs only with HAOPING_COMPOSE_TEST=1 (`make compose-test`, which .ci/run calls after `make test`):
it needs a Docker engine, `docker compose` and the images from `make docker`."""
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from haoping.client import GeneratorClient, ScorerClient, TrainerClient
from conftest import make_tiny_classifier, make_tiny_policy
from services.common.security import write_token_file

pytestmark = pytest.mark.skipif(os.environ.get("HAOPING_COMPOSE_TEST") != "1",
                                reason="set HAOPING_COMPOSE_TEST=1 (make compose-test) to run the compose stack")
ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["trainer", "generator", "scorer", "prometheus"]  # grafana's image needs a registry


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = tmp_path_factory.mktemp("compose-models")
    make_tiny_policy(models / "policy")
    make_tiny_classifier(models / "classifier")
    token_file = write_token_file(tmp_path_factory.mktemp("compose-secret") / "auth-token")
    env = {**os.environ, "HAOPING_CACHE_VOLUME": str(models), "HAOPING_POLICY": "/cache/policy",
           "HAOPING_TOKEN_FILE": str(token_file),
           "HAOPING_SCORER_MODEL": "/cache/classifier", "BASE_IMAGE": os.environ.get("BASE_IMAGE", "python:3.11-slim")}
    compose = ["docker", "compose", "-p", f"haoping-test-{os.getpid()}", "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(ROOT / "tests/compose/tiny-models.yml")]

    def run(*args, timeout=600, check=True):
        return subprocess.run([*compose, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=check)

    try:
        up = run("up", "-d", "--no-build", "--wait", *SERVICES, check=False)
        assert up.returncode == 0, up.stdout + up.stderr + run("logs", check=False).stdout[-5000:]
        run.token_file = token_file
        yield run
    finally:
        run("down", "-v", "--timeout", "20", check=False)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _prometheus_query(expr: str) -> list:
    return _get_json("http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]


def _wait_for(check, timeout=90.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:.0f}s: {check.__doc__}")
        time.sleep(2)


def test_services_answer_on_published_ports(stack):
    with GeneratorClient("127.0.0.1:50051") as generator, ScorerClient("127.0.0.1:50052") as scorer:
        reply = generator.generate(["刚收到货，感觉"], n=2, max_new_tokens=4, seed=1)
        assert len(reply.samples) == 2
        scores = scorer.score([s.full_text for s in reply.samples])
        assert len(scores.scores) == 2 and all(0 <= s.score <= 1 for s in scores.scores)
        assert scores.model_id.endswith("classifier")


def test_prometheus_scrapes_every_service(stack):
    def all_up():
        """Prometheus reports all three haoping targets up"""
        targets = _get_json("http://127.0.0.1:9090/api/v1/targets")["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    _wait_for(all_up)


def test_coordinator_runs_cycles_against_the_running_services(stack):
    with TrainerClient("127.0.0.1:50053", token_file=stack.token_file) as trainer:
        version_before = trainer.info().policy_version
    done = stack("run", "--rm", "-e", "HAOPING_CYCLES=2", "-e", "HAOPING_SAMPLES_PER_PROMPT=2",
                 "-e", "HAOPING_EVAL_SAMPLES=8", "-e", "HAOPING_NAME=compose-test", "coordinator", check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mean reward" in done.stdout
    with TrainerClient("127.0.0.1:50053", token_file=stack.token_file) as trainer, \
            GeneratorClient("127.0.0.1:50051", token_file=stack.token_file) as generator:
        assert trainer.info().policy_version == version_before + 2
        assert generator.info().policy_version == version_before + 2  # the weights reached the generator
        assert generator.info().limits["local_weight_files"] == 1
    # the two containers share the runs volume, so the weights came as a file, never by stream
    with urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'haoping_weight_transfer_bytes_total{direction="read"}' in metrics, metrics[-2000:]
    assert 'haoping_weight_transfer_bytes_total{direction="received"}' not in metrics

    def steps_scraped():
        """Prometheus has scraped the trainer's PPO steps"""
        return any(float(r["value"][1]) >= 2 for r in _prometheus_query("haoping_trainer_steps_total"))

    _wait_for(steps_scraped)
