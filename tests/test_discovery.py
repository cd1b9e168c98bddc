"""Replica discovery with a fake resolver and fake clients: resolve + diff + pick healthy, the
replica set's joins and drops, and fan-out whose samples and scores do not depend on how many
replicas share the work."""
import argparse
import hashlib
import socket

import pytest
from prometheus_client import CollectorRegistry

from haoping.client import GeneratorReplicas, ScorerReplicas, contiguous_shards
from haoping.discovery import ReplicaSet, Target, diff, parse_targets, pick_healthy, resolve_targets
from haoping.v1 import haoping_pb2 as pb
from services.common import metrics
from services.coordinator import discovery
from services.coordinator.run import add_run_flags, run, running_services


class FakeDNS:
    """name -> IP addresses, changed by the test; an unknown name fails like getaddrinfo."""

    def __init__(self, names: dict[str, list[str]]):
        self.names = names
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.names[host])


def test_parse_targets_takes_host_port_and_dns_names_and_names_the_flag_of_a_bad_entry():
    targets = parse_targets(" dns:///generator.haoping:50051, 10.0.0.3:50051,[::1]:7 ,", "--generator-addresses")
    assert targets == [Target("dns:///generator.haoping:50051", "generator.haoping", 50051, True),
                       Target("10.0.0.3:50051", "10.0.0.3", 50051, False), Target("[::1]:7", "::1", 7, False)]
    for bad in ("", "generator", "generator:", "generator:0", "generator:70000", "dns://8.8.8.8/generator:50051",
                "dns:///generator", "unix:///tmp/socket", "http://generator:50051"):
        with pytest.raises(ValueError, match="--generator-addresses"):
            parse_targets(bad, "--generator-addresses")


def test_resolve_targets_keeps_order_sorts_each_names_addresses_and_skips_a_name_that_fails(caplog):
    dns = FakeDNS({"generators": ["10.0.0.9", "10.0.0.2", "10.0.0.9"], "v6": ["fd00::1"]})
    targets = parse_targets("10.0.0.2:50051,dns:///generators:50051,dns:///missing:50051,dns:///v6:1", "--x")
    resolved = resolve_targets(targets, dns)
    assert [address for address, _ in resolved] == ["10.0.0.2:50051", "10.0.0.9:50051", "[fd00::1]:1"]
    assert resolved[1][1] is targets[1]  # the target each address came from (for a TLS server name)
    assert ("generators", 50051) in dns.asked and ("missing", 50051) in dns.asked
    assert "dns:///missing:50051 does not resolve" in caplog.text


def test_diff_and_pick_healthy():
    assert diff(["a", "b", "c"], ["b", "d", "a"]) == (["d"], ["c"])
    assert diff([], []) == ([], [])
    assert pick_healthy(["a", "b", "c"], lambda address: address != "b") == ["a", "c"]


def test_contiguous_shards_cover_every_index_once_in_order():
    for n in range(0, 12):
        for parts in range(1, 6):
            plan = contiguous_shards(n, parts)
            assert [i for first, count in plan for i in range(first, first + count)] == list(range(n))
            counts = [count for _, count in plan]
            assert all(count > 0 for count in counts) and (not counts or max(counts) - min(counts) <= 1)


class FakeGenerator:
    """Samples that depend only on (seed, prompt index, sample index, weights version), like the
    real generator's per-sample seeds; ``up`` is its health."""

    def __init__(self, address: str, log: list):
        self.address, self.log, self.up, self.version, self.closed = address, log, True, 0, False

    def health_status(self) -> str:
        return "SERVING" if self.up else "UNAVAILABLE"

    def close(self) -> None:
        self.closed = True

    def generate(self, prompts, n, seed, first_sample_index=0, **kwargs):
        self.log.append((self.address, first_sample_index, n))
        samples = []
        for p in range(len(prompts)):
            for s in range(first_sample_index, first_sample_index + n):
                text = hashlib.sha256(f"{seed}/{p}/{s}/{self.version}".encode()).hexdigest()[:8]
                samples.append(pb.Sample(prompt_index=p, sample_index=s, text=text, policy_version=self.version))
        return pb.GenerateResponse(samples=samples, policy_version=self.version)

    def load_weights(self, trainer_address="", version=0):
        self.log.append((self.address, "load", trainer_address, version))
        self.version = version or 7
        return pb.LoadWeightsResponse(policy_version=self.version, bytes=1)


class FakeScorer:
    def __init__(self, address: str, log: list):
        self.address, self.log, self.up = address, log, True

    def health_status(self) -> str:
        return "SERVING" if self.up else "UNAVAILABLE"

    def close(self) -> None:
        pass

    def score(self, texts, normalization=pb.SCORE_NORMALIZATION_NONE):
        self.log.append((self.address, len(texts)))
        self.normalization = normalization
        return pb.ScoreResponse(scores=[pb.TextScore(score=len(t) / 10, label=t) for t in texts], model_id="m",
                                backend="classifier")


def fake_set(role: str, dns: FakeDNS, spec: str, make, changes: list | None = None):
    clients: dict[str, object] = {}
    calls: list = []

    def connect(address, _target):
        clients[address] = make(address, calls)
        return clients[address]

    replicas = ReplicaSet(role, parse_targets(spec, "--x"), connect, resolver=dns,
                          on_change=None if changes is None else lambda *change: changes.append(change))
    return replicas, clients, calls


def test_a_replica_set_adds_what_resolves_and_serves_and_drops_what_is_gone_or_dead():
    dns = FakeDNS({"generators": ["10.0.0.1"]})
    changes = []
    replicas, clients, _ = fake_set("generator", dns, "dns:///generators:50051", FakeGenerator, changes)
    assert replicas.refresh() == (["10.0.0.1:50051"], [])
    assert replicas.refresh() == ([], [])  # nothing changed: nothing reported
    dns.names["generators"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert replicas.refresh() == (["10.0.0.2:50051", "10.0.0.3:50051"], [])
    clients["10.0.0.2:50051"].up = False  # dead but still in DNS (e.g. before the readiness probe fails)
    assert replicas.refresh() == ([], ["10.0.0.2:50051"])
    assert replicas.members == ["10.0.0.1:50051", "10.0.0.3:50051"]
    assert not clients["10.0.0.2:50051"].closed  # kept: it may serve again
    clients["10.0.0.2:50051"].up = True
    assert replicas.refresh() == (["10.0.0.2:50051"], [])
    dns.names["generators"] = ["10.0.0.3"]  # scaled down: gone from DNS, its client closed
    assert replicas.refresh() == ([], ["10.0.0.1:50051", "10.0.0.2:50051"])
    assert clients["10.0.0.1:50051"].closed and [c.address for c in replicas.clients()] == ["10.0.0.3:50051"]
    del dns.names["generators"]  # the name fails: no member (the caller waits for one)
    assert replicas.refresh() == ([], ["10.0.0.3:50051"]) and replicas.clients() == []
    assert [(added, dropped, len(members)) for _, added, dropped, members in changes] == [
        (["10.0.0.1:50051"], [], 1), (["10.0.0.2:50051", "10.0.0.3:50051"], [], 3), ([], ["10.0.0.2:50051"], 2),
        (["10.0.0.2:50051"], [], 3), ([], ["10.0.0.1:50051", "10.0.0.2:50051"], 1), ([], ["10.0.0.3:50051"], 0)]


def test_await_members_waits_for_one_to_serve_and_times_out_naming_the_targets():
    dns = FakeDNS({})
    replicas, _, _ = fake_set("scorer", dns, "dns:///scorers:50052", FakeScorer)
    with pytest.raises(TimeoutError, match="no scorer serving at dns:///scorers:50052"):
        replicas.await_members(0.2, poll_seconds=0.05)
    dns.names["scorers"] = ["10.0.0.5"]
    replicas.await_members(1, poll_seconds=0.05)
    assert replicas.members == ["10.0.0.5:50052"]


def test_samples_do_not_depend_on_how_many_replicas_share_a_rollout_and_a_joiner_loads_the_weights_first():
    dns = FakeDNS({"generators": ["10.0.0.1"]})
    replica_set, clients, calls = fake_set("generator", dns, "dns:///generators:50051", FakeGenerator)
    generators = GeneratorReplicas.discovered(replica_set)
    generators.refresh()
    generators.load_weights("trainer:50053", 3)
    prompts = ["a", "b"]

    def samples():
        response = generators.generate(prompts, n=5, seed=11)
        return [(s.prompt_index, s.sample_index, s.text, s.policy_version) for s in response.samples]

    alone = samples()
    for ips in (["10.0.0.1", "10.0.0.2"], ["10.0.0.1", "10.0.0.2", "10.0.0.3"], ["10.0.0.3"]):
        dns.names["generators"] = ips
        generators.refresh()
        assert samples() == alone, ips
    # each joiner loaded version 3 from the trainer before its first Generate
    for address in ("10.0.0.2:50051", "10.0.0.3:50051"):
        mine = [c for c in calls if c[0] == address]
        assert mine[0] == (address, "load", "trainer:50053", 3), mine
    shards = [(first, n) for address, first, n in (c for c in calls if len(c) == 3 and c[1] != "load")][-4:]
    assert shards == [(0, 2), (2, 2), (4, 1), (0, 5)]  # the 3-replica split, then one replica alone


def test_a_joiner_that_cannot_load_the_weights_waits_for_the_next_refresh():
    dns = FakeDNS({"generators": ["10.0.0.1"]})
    replica_set, clients, _ = fake_set("generator", dns, "dns:///generators:50051", FakeGenerator)
    generators = GeneratorReplicas.discovered(replica_set)
    generators.refresh()
    generators.load_weights("trainer:50053")
    dns.names["generators"] = ["10.0.0.1", "10.0.0.2"]
    replica_set.refresh(lambda client: False)  # e.g. its LoadWeights failed
    assert replica_set.members == ["10.0.0.1:50051"]

    def failing(*_args):
        raise RuntimeError("trainer refused\nmore")

    clients["10.0.0.2:50051"].load_weights = failing
    assert generators.refresh() == ([], []) and replica_set.members == ["10.0.0.1:50051"]
    del clients["10.0.0.2:50051"].load_weights  # the class's own again
    assert generators.refresh() == (["10.0.0.2:50051"], [])
    assert clients["10.0.0.2:50051"].version == 7


def test_a_score_batch_is_split_across_the_scorers_in_order():
    dns = FakeDNS({"scorers": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]})
    replica_set, _, calls = fake_set("scorer", dns, "dns:///scorers:50052", FakeScorer)
    scorers = ScorerReplicas(replica_set)
    scorers.refresh()
    texts = [f"text-{i}" * (i + 1) for i in range(7)]
    response = scorers.score(texts)
    assert [s.label for s in response.scores] == texts and response.model_id == "m"
    assert sorted(calls) == [("10.0.0.1:50052", 3), ("10.0.0.2:50052", 2), ("10.0.0.3:50052", 2)]
    assert list(scorers.score([]).scores) == []
    scorers.score(texts, pb.SCORE_NORMALIZATION_SIGMOID)  # the request's options reach every replica
    assert {client.normalization for client in scorers.clients} == {pb.SCORE_NORMALIZATION_SIGMOID}


def test_a_fixed_list_is_a_replica_set_of_those_clients():
    log = []
    generators = GeneratorReplicas([FakeGenerator("127.0.0.1:1", log), FakeGenerator("127.0.0.1:2", log)])
    assert [c.address for c in generators.clients] == ["127.0.0.1:1", "127.0.0.1:2"]
    generators.clients[1].up = False
    assert generators.refresh() == ([], ["127.0.0.1:2"])


def test_changes_are_counted_in_the_coordinators_metrics():
    registry = CollectorRegistry()
    for collector in metrics.SERVICE_COLLECTORS["coordinator"]:
        registry.register(collector)

    def value(name, role):
        return registry.get_sample_value(name, {"role": role}) or 0.0

    before = value("haoping_replicas_dropped_total", "generator"), value("haoping_replicas_added_total", "generator")
    discovery.count_change("generator", ["a:1", "b:1"], ["c:1"], ["a:1", "b:1", "d:1"])
    assert value("haoping_replicas_dropped_total", "generator") == before[0] + 1
    assert value("haoping_replicas_added_total", "generator") == before[1] + 2
    assert value("haoping_replicas", "generator") == 3


def test_tls_checks_the_names_certificate_when_dialing_the_address_it_resolved_to():
    from haoping.client import TLSFiles

    access = {"token_file": None, "tls": TLSFiles(ca="ca.pem")}
    name, fixed = parse_targets("dns:///generator.haoping:50051,10.0.0.1:50051", "--x")
    assert discovery.access_for(access, name)["tls"].server_name == "generator.haoping"
    assert discovery.access_for(access, fixed) is access
    given = {"tls": TLSFiles(ca="ca.pem", server_name="other")}
    assert discovery.access_for(given, name) is given


def _run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return parser.parse_args(list(argv))


def test_running_services_parses_the_address_flags():
    trainer, generators, scorers = running_services(_run_args(
        "--trainer-address", "trainer-0.trainer:50053", "--generator-addresses", "dns:///generator:50051",
        "--scorer-address", "dns:///scorer:50052,10.0.0.8:50052"))
    assert trainer == "trainer-0.trainer:50053"
    assert [t.text for t in generators] == ["dns:///generator:50051"] and generators[0].dns
    assert [(t.host, t.dns) for t in scorers] == [("scorer", True), ("10.0.0.8", False)]


@pytest.mark.parametrize("flag, value", [("--generator-addresses", "dns:///generator"),
                                         ("--scorer-address", "scorer:http"), ("--metrics-address", "nowhere")])
def test_haoping_run_refuses_a_malformed_address_with_exit_code_2(tmp_path, capsys, flag, value):
    addresses = {"--trainer-address": "127.0.0.1:1", "--generator-addresses": "127.0.0.1:2",
                 "--scorer-address": "127.0.0.1:3", flag: value}
    argv = [item for pair in addresses.items() for item in pair]
    assert run(_run_args(*argv, "--runs-dir", str(tmp_path))) == 2
    assert flag in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_the_coordinators_metrics_endpoint_serves_the_replica_counts():
    import urllib.request

    discovery.count_change("scorer", ["10.0.0.1:50052"], [], ["10.0.0.1:50052"])
    port = discovery.start_metrics("127.0.0.1:0")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert 'haoping_replicas{role="scorer"} 1.0' in body
    assert 'haoping_replicas_added_total{role="scorer"}' in body
