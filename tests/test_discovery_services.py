"""Discovery with the real services on loopback: a name that resolves (through an injected
resolver) to a generator and a scorer on 127.0.0.1 and two more on 127.0.0.2, on the same ports,
as a Kubernetes headless Service answers with each pod's IP. Samples and scores do not depend on
how many replicas share the work; a replica killed with SIGKILL is dropped and the cycles go on;
and `haoping run` takes dns:///NAME:PORT through the system's resolver."""
import json
import re
import signal
import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import pytest

from haoping.client import GeneratorClient, TrainerClient
from haoping.discovery import parse_targets
from services.common import metrics
from services.coordinator import discovery
from services.coordinator.run import DEFAULT_PROMPTS, Coordinator, launch_service, stop_services, wait_ready

pytestmark = pytest.mark.slow
PPO = json.dumps({"learning_rate": 0.01, "minibatch_size": 8})


@pytest.fixture(scope="module")
def loopback(tiny_policy, tiny_classifier, tmp_path_factory):
    """A trainer; generator and scorer on 127.0.0.1; generator-2 and scorer-2 on 127.0.0.2 at the same ports."""
    run_dir = tmp_path_factory.mktemp("loopback")
    (run_dir / "logs").mkdir()
    services = []
    common = ["--device", "cpu", "--threads", "1"]
    try:
        trainer = launch_service("trainer", ["--model", str(tiny_policy), "--ppo-config", PPO, *common,
                                             "--checkpoint-dir", str(run_dir / "checkpoints")], run_dir)
        services.append(trainer)
        scorer = launch_service("scorer", ["--model", str(tiny_classifier), *common], run_dir)
        services.append(scorer)
        wait_ready(trainer, 120)
        generator_args = ["--model", str(tiny_policy), *common, "--trainer-address", trainer.address]
        generator = launch_service("generator", generator_args, run_dir)
        services.append(generator)
        wait_ready(generator, 120)
        wait_ready(scorer, 120)
        port = {name: s.address.rsplit(":", 1)[1] for name, s in (("generator", generator), ("scorer", scorer))}
        second = [launch_service("generator", [*generator_args, "--host", "127.0.0.2", "--port", port["generator"]],
                                 run_dir, label="generator-2"),
                  launch_service("scorer", ["--model", str(tiny_classifier), *common, "--host", "127.0.0.2",
                                            "--port", port["scorer"]], run_dir, label="scorer-2")]
        services += second
        for service in second:
            wait_ready(service, 120)
        yield SimpleNamespace(run_dir=run_dir, trainer=trainer, generator=generator, scorer=scorer,
                              generator_2=second[0], scorer_2=second[1], port=port,
                              access={"token_file": trainer.token_file, "tls": None})
    finally:
        stop_services(services)


class FakeDNS:
    def __init__(self, names):
        self.names = names

    def __call__(self, host, port):
        return list(self.names[host])


def generated_samples(service) -> float:
    host = service.address.rsplit(":", 1)[0]
    with urllib.request.urlopen(f"http://{host}:{service.metrics_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return sum(float(v) for v in re.findall(r"^haoping_generated_samples_total\{[^}]*\} (\S+)$", body, re.M))


def run_args(cycles: int) -> SimpleNamespace:
    return SimpleNamespace(prompts=DEFAULT_PROMPTS, samples_per_prompt=3, max_new_tokens=6, eval_samples=4, seed=0,
                           cycles=cycles, max_seconds=0.0, min_new_tokens=2, max_kl=6.0, min_distinct2_ratio=0.5,
                           max_repetition_rate=0.1, checkpoint_every=0, service_wait_seconds=30.0)


def test_a_name_behind_two_loopback_addresses_splits_the_work_and_drops_a_killed_replica(loopback, tmp_path):
    dns = FakeDNS({"generators.test": ["127.0.0.1"], "scorers.test": ["127.0.0.1"]})
    generator_targets = parse_targets(f"dns:///generators.test:{loopback.port['generator']}", "--generator-addresses")
    scorer_targets = parse_targets(f"dns:///scorers.test:{loopback.port['scorer']}", "--scorer-address")
    request = dict(n=5, max_new_tokens=6, min_new_tokens=2, seed=5)
    texts = [f"刚收到货，感觉{'很好' * i}" for i in range(9)]
    dropped_before = metrics.REPLICAS_DROPPED.labels("generator")._value.get()
    with discovery.generator_replicas(generator_targets, loopback.access, 60, resolver=dns) as generators, \
            discovery.scorer_replicas(scorer_targets, loopback.access, 60, resolver=dns) as scorers, \
            TrainerClient(loopback.trainer.address, **loopback.access) as trainer, \
            GeneratorClient(loopback.generator.address, **loopback.access) as lone_generator:
        generators.refresh()
        scorers.refresh()
        assert generators.load_weights(loopback.trainer.address).policy_version == 0
        alone_scores = [s.score for s in scorers.score(texts).scores]
        coordinator = Coordinator(run_args(2), generators, scorers, trainer, loopback.trainer.address, tmp_path,
                                  discovered=(generators, scorers))
        records = coordinator.run()  # two updates with one generator: it holds version 2
        assert [(r["replicas/generator"], r["replicas/scorer"]) for r in records] == [(1, 1), (1, 1)]

        dns.names = {"generators.test": ["127.0.0.2", "127.0.0.1"], "scorers.test": ["127.0.0.1", "127.0.0.2"]}
        second = f"127.0.0.2:{loopback.port['generator']}"
        assert generators.refresh() == ([second], [])
        assert scorers.refresh() == ([f"127.0.0.2:{loopback.port['scorer']}"], [])
        # the joiner (started at version 0) loaded the others' version before it got work
        with GeneratorClient(second, **loopback.access) as joiner:
            assert joiner.info().policy_version == 2
        served_before = generated_samples(loopback.generator_2)
        shared = generators.generate(DEFAULT_PROMPTS, **request)
        assert generated_samples(loopback.generator_2) - served_before == 2 * len(DEFAULT_PROMPTS)  # its shard
        alone = lone_generator.generate(DEFAULT_PROMPTS, **request)
        assert [(s.prompt_index, s.sample_index, list(s.response_token_ids), s.policy_version)
                for s in shared.samples] == \
            [(s.prompt_index, s.sample_index, list(s.response_token_ids), s.policy_version) for s in alone.samples]
        assert [s.score for s in scorers.score(texts).scores] == pytest.approx(alone_scores, abs=1e-5)

        coordinator.args.cycles = 4
        records = coordinator.run()
        assert [(r["replicas/generator"], r["replicas/scorer"]) for r in records[2:]] == [(2, 2), (2, 2)]

        loopback.generator_2.process.send_signal(signal.SIGKILL)  # still in "DNS", no longer serving
        loopback.generator_2.process.wait(10)
        coordinator.args.cycles = 6
        records = coordinator.run()
        assert [r["cycle"] for r in records] == list(range(6))  # each once
        assert [r["replicas/generator"] for r in records[4:]] == [1, 1]
        assert metrics.REPLICAS_DROPPED.labels("generator")._value.get() == dropped_before + 1
        assert [c.address for c in generators.clients] == [loopback.generator.address]
        after = generators.generate(DEFAULT_PROMPTS, **request)
        direct = lone_generator.generate(DEFAULT_PROMPTS, **request)
        assert [list(s.response_token_ids) for s in after.samples] == [list(s.response_token_ids) for s in direct.samples]


def test_haoping_run_resolves_dns_names_with_the_systems_resolver(loopback, tmp_path):
    """localhost resolves to 127.0.0.1 (and on some hosts ::1 too, where nothing serves: not used)."""
    command = [sys.executable, "-m", "services.cli", "run", "--runs-dir", str(tmp_path), "--name", "dns",
               "--cycles", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--min-new-tokens", "2",
               "--eval-samples", "4", "--checkpoint-every", "0", "--auth-token-file", str(loopback.trainer.token_file),
               "--trainer-address", loopback.trainer.address,
               "--generator-addresses", f"dns:///localhost:{loopback.port['generator']}",
               "--scorer-address", f"dns:///localhost:{loopback.port['scorer']}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (tmp_path / "dns" / "cycles.jsonl").read_text().splitlines()]
    assert [(r["cycle"], r["replicas/generator"], r["replicas/scorer"]) for r in records] == [(0, 1, 1), (1, 1, 1)]
    assert f"generator replicas: 1 serving (127.0.0.1:{loopback.port['generator']})" in result.stderr
