"""The Kubernetes manifests (deploy/k8s) agree with the code: each overlay renders with
`kubectl kustomize`, passes the Kubernetes API schema, and its ports, probes, flags, metric ports,
mounts and addresses match what each service's parser makes of them."""
import argparse
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT as C10D_RENDEZVOUS_PORT

from services.cli import build_parser as cli_parser
from services.common.config import env_name
from services.coordinator.run import SERVICE_FLAGS, add_run_flags, running_services
from services.generator.server import build_parser as generator_parser
from services.scorer.server import build_parser as scorer_parser
from services.trainer.server import build_parser as trainer_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
PARSERS = {"generator": generator_parser, "scorer": scorer_parser, "trainer": trainer_parser}
OVERLAYS = {"cpu": {"device": "cpu", "dtype": "float32", "image": "haoping:latest", "gpus": 0},
            "gpu": {"device": "cuda", "dtype": "bfloat16", "image": "haoping:cuda", "gpus": 1}}
# the oldest Kubernetes these manifests are checked against (gRPC probes are GA from 1.27) and the newest
SCHEMA_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# peak RSS of each process in a 5-cycle `haoping run` on the starter models, and of `haoping bootstrap`
# (docs/kubernetes.md)
MEASURED_PEAK_MIB = {"generator": 475, "scorer": 390, "trainer": 613, "coordinator": 383, "bootstrap": 1429}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    not KUBECTL and not os.environ.get("HAOPING_REQUIRE_KUBECTL"),
    reason="kubectl is not installed (it renders the kustomize overlays)")


def _kustomize(tree: Path, overlay: str) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL or "kubectl", "kustomize", str(tree / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)


def _copy_tree(tmp: Path, token: str | None) -> Path:
    """deploy/k8s as a user would have it: without any token file, then with `token` if given."""
    tree = tmp / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("auth-token"))
    if token is not None:
        (tree / "base/auth-token").write_text(token)
    return tree


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request, tmp_path_factory, token):
    """(overlay name, its rendered objects)"""
    if not KUBECTL and not os.environ.get("HAOPING_REQUIRE_KUBECTL"):
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    done = _kustomize(_copy_tree(tmp_path_factory.mktemp("k8s"), token), request.param)
    assert done.returncode == 0, done.stderr
    return request.param, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workload(objects: list[dict], name: str) -> dict:
    kind = {"trainer": "StatefulSet", "coordinator": "Job"}.get(name, "Deployment")
    return _find(objects, kind, name)


def _container(pod: dict, name: str, init: bool = False) -> dict:
    found = [c for c in pod["spec"]["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


POD_IP = "10.244.0.7"  # what the downward API's status.podIP gives a container, for parsing


def _env(container: dict) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, var["name"]
            env[var["name"]] = POD_IP
            continue
        assert "value" in var, f"{var['name']}: only literal values and the pod's IP are checked"
        env[var["name"]] = var["value"]
    return env


def _parse(factory, argv: list[str], env: dict[str, str], monkeypatch):
    """What the container's process makes of its args and HAOPING_* env; every HAOPING_* name must be
    a flag's fallback (add_flag reads the environment when the parser is built)."""
    for name in [n for n in os.environ if n.startswith("HAOPING_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = factory()
    flags = {option for action in parser._actions for option in action.option_strings}
    fallbacks = {env_name(flag) for flag in flags if flag.startswith("--")}
    unknown = {n for n in env if n.startswith("HAOPING_")} - fallbacks
    assert not unknown, f"no flag reads {sorted(unknown)}"
    # each flag spelt out: argparse would also take a prefix, which a new flag can make ambiguous
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    assert given <= flags, f"no such flag: {sorted(given - flags)}"
    return parser.parse_args(argv)


def _cli(argv: list[str]) -> argparse.Namespace:
    """The image's entrypoint is `haoping`: which command the container's args run."""
    return cli_parser().parse_args(argv)


def _service_args(container: dict, service: str, monkeypatch) -> argparse.Namespace:
    """The container runs `haoping serve <service> ...`: parse it the way services.cli does."""
    cli = _cli(container["args"])
    assert (cli.command, cli.service) == ("serve", service)
    return _parse(PARSERS[service], cli.service_args, _env(container), monkeypatch)


def _run_args(container: dict, monkeypatch) -> argparse.Namespace:
    def run_parser():
        parser = argparse.ArgumentParser()
        add_run_flags(parser)
        return parser

    assert _cli(container["args"]).command == "run"
    return _parse(run_parser, container["args"][1:], _env(container), monkeypatch)


def _port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return ports[name]


def _mounts(pod: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    """mount path -> (volumeMount, volume)"""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container.get("volumeMounts", [])}


def _claim_mounted_at(pod: dict, container: dict, path: str) -> str:
    mount, volume = _mounts(pod, container)[path]
    return volume["persistentVolumeClaim"]["claimName"]


def _quantity(value) -> float:
    """A Kubernetes quantity as a number: CPUs, or bytes."""
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti)?", str(value))
    assert match, value
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return float(match.group(1)) * scale


def _compose_scrape_jobs() -> set[str]:
    """The dashboard selects each service's series by job: the job names of deploy/prometheus.yml."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


def _image_cache_dir() -> str:
    """$HAOPING_CACHE as the image sets it (docker/Dockerfile)."""
    match = re.search(r"HAOPING_CACHE=(\S+)", (ROOT / "docker/Dockerfile").read_text())
    assert match
    return match.group(1)


@needs_kubectl
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_an_overlay_does_not_render_without_the_users_token_file(overlay, tmp_path):
    done = _kustomize(_copy_tree(tmp_path, token=None), overlay)
    assert done.returncode != 0
    assert "auth-token" in done.stderr


def test_the_token_file_is_never_committed():
    ignored = (K8S / ".gitignore").read_text().split()
    assert "base/auth-token" in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "deploy/k8s"], cwd=ROOT, capture_output=True, text=True).stdout
        assert "auth-token" not in tracked.split()
        assert "deploy/k8s/base/auth-token" not in tracked.split()


def test_each_overlay_renders_the_whole_stack_in_its_namespace(rendered):
    overlay, objects = rendered
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "Secret")
    assert kinds == sorted([("Namespace", "haoping"), ("PersistentVolumeClaim", "haoping-cache"),
                            ("PersistentVolumeClaim", "haoping-runs"), ("Service", "generator"),
                            ("Service", "scorer"), ("Service", "trainer"), ("Deployment", "generator"),
                            ("Deployment", "scorer"), ("StatefulSet", "trainer"), ("Job", "coordinator"),
                            *(("NetworkPolicy", name) for name in ("default-deny-ingress", *PARSERS, "coordinator"))])
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "haoping", obj["metadata"]["name"]
    for name in [*PARSERS, "coordinator"]:
        pod = _workload(objects, name)["spec"]["template"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "haoping"
        assert pod["spec"]["enableServiceLinks"] is False  # no SERVICE_PORT=tcp://... beside HAOPING_*
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            # the image compose builds (`make docker`); IfNotPresent so a locally loaded :latest is used
            assert container["image"] == OVERLAYS[overlay]["image"], container["name"]
            assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_rendered_object_passes_the_kubernetes_schema_strictly(rendered, version):
    _, objects = rendered
    for obj in objects:
        # strict: an unknown field (a typo such as `readinessprobe`) fails too
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field(rendered):
    _, objects = rendered
    broken = yaml.safe_load(yaml.safe_dump(_workload(objects, "generator")))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("service", sorted(PARSERS))
def test_ports_probes_and_metrics_agree_with_each_services_parser(rendered, service, monkeypatch):
    overlay, objects = rendered
    pod = _workload(objects, service)["spec"]["template"]
    container = _container(pod, service)
    args = _service_args(container, service, monkeypatch)
    assert args.host == "0.0.0.0"  # reachable on the pod IP by the kubelet's probes and other pods
    assert _port(container, "grpc") == args.port
    assert _port(container, "metrics") == args.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port, probe  # grpc.health.v1 on the gRPC port
        assert container[probe].get("grpc", {}).get("service", "") == ""  # the overall status
    # the compose Prometheus job of this service has its name; docs/kubernetes.md relabels job from it
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == service in _compose_scrape_jobs()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace_seconds + args.drain_announce_seconds

    svc = _find(objects, "Service", service)
    assert svc["spec"]["clusterIP"] == "None"  # headless: DNS answers with the pods' addresses
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports["grpc"] == (args.port, "grpc")
    assert ports["metrics"] == (args.metrics_port, "metrics")

    assert (args.device, args.dtype) == (OVERLAYS[overlay]["device"], OVERLAYS[overlay]["dtype"])
    limits = container["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) == OVERLAYS[overlay]["gpus"]
    # torch would start a thread per node core, not per core the pod may use
    assert 0 < args.threads <= _quantity(limits["cpu"])


@pytest.mark.parametrize("service", sorted(PARSERS))
def test_starter_models_come_from_the_bootstrap_init_container_into_the_shared_cache(rendered, service,
                                                                                      monkeypatch):
    _, objects = rendered
    pod = _workload(objects, service)["spec"]["template"]
    args = _service_args(_container(pod, service), service, monkeypatch)
    assert args.model.startswith("starter:")
    cache = _image_cache_dir()
    bootstrap = _container(pod, "bootstrap", init=True)
    assert _cli(bootstrap["args"]).command == "bootstrap"
    mount, _ = _mounts(pod, bootstrap)[cache]
    assert not mount.get("readOnly", False)
    assert _claim_mounted_at(pod, bootstrap, cache) == "haoping-cache"
    mount, _ = _mounts(pod, _container(pod, service))[cache]
    assert mount["readOnly"] is True  # only bootstrap writes the cache
    assert _claim_mounted_at(pod, _container(pod, service), cache) == "haoping-cache"


@pytest.mark.parametrize("workload", [*sorted(PARSERS), "coordinator"])
def test_the_auth_token_is_the_users_secret_mounted_as_a_file(rendered, token, workload):
    _, objects = rendered
    pod = _workload(objects, workload)["spec"]["template"]
    container = _container(pod, workload)
    path = Path(_env(container)[env_name("--auth-token-file")])
    mount, volume = _mounts(pod, container)[str(path.parent)]
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o400
    secret = _find(objects, "Secret", volume["secret"]["secretName"])
    assert secret["metadata"]["name"].startswith("haoping-auth-")  # generated: a new token rolls the pods
    assert base64.b64decode(secret["data"][path.name]).decode() == token


def test_the_trainer_is_a_statefulset_ready_for_a_torchrun_rendezvous(rendered, monkeypatch):
    _, objects = rendered
    statefulset = _workload(objects, "trainer")
    svc = _find(objects, "Service", "trainer")
    assert statefulset["spec"]["serviceName"] == "trainer"
    assert statefulset["spec"]["replicas"] == 1  # one trainer process today
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"  # every rank starts at once
    assert svc["spec"]["publishNotReadyAddresses"] is True  # ranks resolve each other before ready
    container = _container(statefulset["spec"]["template"], "trainer")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert _port(container, "rendezvous") == C10D_RENDEZVOUS_PORT
    assert ports["rendezvous"] == (C10D_RENDEZVOUS_PORT, "rendezvous")


def _policy_rules(objects: list[dict], workload: str) -> tuple[set[int], set[str]]:
    """What the NetworkPolicies let reach a workload's pods: the ports open to any source, and the
    workloads whose pods may connect on any port."""
    labels = _workload(objects, workload)["spec"]["template"]["metadata"]["labels"]
    open_ports, peers = set(), set()
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        if not spec["podSelector"].get("matchLabels", {}).items() <= labels.items():
            continue
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec.get("ingress", []):
            if "from" not in rule:
                open_ports |= {p["port"] for p in rule["ports"]}
                continue
            assert "ports" not in rule  # the data plane's ports are ephemeral (gloo, NCCL)
            for source in rule["from"]:
                assert set(source) == {"podSelector"}  # pods of this namespace, never an IP block
                (expression,) = source["podSelector"]["matchExpressions"]
                assert (expression["key"], expression["operator"]) == ("app.kubernetes.io/name", "In")
                peers |= set(expression["values"])
    return open_ports, peers


def test_only_grpc_and_metrics_are_open_and_the_data_plane_is_the_stacks_own(rendered, monkeypatch):
    _, objects = rendered
    deny = _find(objects, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}  # no rule: nothing else gets in
    for service in PARSERS:
        args = _service_args(_container(_workload(objects, service)["spec"]["template"], service), service,
                             monkeypatch)
        open_ports, peers = _policy_rules(objects, service)
        assert open_ports == {args.port, args.metrics_port}, service
        # torch.distributed: the trainer's ranks and the weight group's members, nobody else
        assert peers == ({"trainer", "generator"} if service in ("trainer", "generator") else set()), service
    coordinator = _container(_workload(objects, "coordinator")["spec"]["template"], "coordinator")
    assert _policy_rules(objects, "coordinator") == ({_port(coordinator, "metrics")}, set())


def test_weight_broadcast_runs_on_the_pods_own_addresses(rendered, monkeypatch):
    _, objects = rendered
    trainer = _service_args(_container(_workload(objects, "trainer")["spec"]["template"], "trainer"), "trainer",
                            monkeypatch)
    # on a wildcard --host the trainer turns broadcast off; the downward API gives it the pod's IP
    assert (trainer.host, trainer.weight_group_address) == ("0.0.0.0", POD_IP)
    assert _port(_container(_workload(objects, "trainer")["spec"]["template"], "trainer"),
                 "weight-group") == trainer.weight_group_port
    generator = _service_args(_container(_workload(objects, "generator")["spec"]["template"], "generator"),
                              "generator", monkeypatch)
    assert generator.weight_group_host == POD_IP
    run = _run_args(_container(_workload(objects, "coordinator")["spec"]["template"], "coordinator"), monkeypatch)
    assert run.weight_sync == "broadcast"


def _address(objects: list[dict], address: str) -> tuple[str, int]:
    """The workload a `host:port` in the manifests reaches, and the port (checked to be its Service's)."""
    host, port = address.rsplit(":", 1)
    parts = host.split(".")
    if len(parts) == 2:  # <statefulset>-<ordinal>.<service>: one pod's stable name
        svc = _find(objects, "Service", parts[1])
        pod_name, ordinal = parts[0].rsplit("-", 1)
        statefulset = _find(objects, "StatefulSet", pod_name)
        assert statefulset["spec"]["serviceName"] == parts[1]
        assert 0 <= int(ordinal) < statefulset["spec"]["replicas"]
    else:
        assert len(parts) == 1, address
        svc = _find(objects, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}, address
    return svc["metadata"]["name"], int(port)


def test_the_coordinator_runs_against_the_services_dns_names(rendered, monkeypatch):
    _, objects = rendered
    job = _workload(objects, "coordinator")
    pod = job["spec"]["template"]
    container = _container(pod, "coordinator")
    run = _run_args(container, monkeypatch)
    trainer, generators, scorers = running_services(run)  # raises on a partial set or on service flags
    # running_services compares with defaults that include the environment, so it cannot see these
    service_flags = {env_name("--" + flag.replace("_", "-")) for flag in SERVICE_FLAGS}
    assert not service_flags & _env(container).keys(), "the services take these from their own flags"
    assert _address(objects, trainer)[0] == "trainer"
    # generators and scorers by their headless Service's name, resolved again every cycle (every ready pod)
    assert [(t.dns, _address(objects, f"{t.host}:{t.port}")[0]) for t in generators] == [(True, "generator")]
    assert [(t.dns, _address(objects, f"{t.host}:{t.port}")[0]) for t in scorers] == [(True, "scorer")]
    # trainer rank 0: the pod that serves gRPC once the trainer runs several processes
    assert trainer.startswith("trainer-0.")
    for service, address in (("trainer", trainer), ("generator", f"{generators[0].host}:{generators[0].port}"),
                             ("scorer", f"{scorers[0].host}:{scorers[0].port}")):
        service_pod = _workload(objects, service)["spec"]["template"]
        assert _address(objects, address)[1] == _service_args(_container(service_pod, service), service,
                                                              monkeypatch).port
    generator_pod = _workload(objects, "generator")["spec"]["template"]
    assert _service_args(_container(generator_pod, "generator"), "generator", monkeypatch).trainer_address == trainer
    assert job["spec"]["backoffLimit"] == 0 and pod["spec"]["restartPolicy"] == "Never"
    # its own /metrics (replica counts), where the scrape annotations point
    metrics_host, metrics_port = run.metrics_address.rsplit(":", 1)
    assert metrics_host == "0.0.0.0" and _port(container, "metrics") == int(metrics_port)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == metrics_port

    wait = _container(pod, "wait-for-services", init=True)
    assert "services.common.healthcheck" in wait["args"][0]
    addresses = {k: v for k, v in _env(container).items()
                 if k.endswith(("_ADDRESS", "_ADDRESSES")) and k != "HAOPING_METRICS_ADDRESS"}
    assert _env(wait) == addresses


def test_runs_and_checkpoints_share_one_claim_at_one_path(rendered, monkeypatch):
    _, objects = rendered
    coordinator_pod = _workload(objects, "coordinator")["spec"]["template"]
    coordinator = _container(coordinator_pod, "coordinator")
    run = _run_args(coordinator, monkeypatch)
    trainer_pod = _workload(objects, "trainer")["spec"]["template"]
    trainer = _service_args(_container(trainer_pod, "trainer"), "trainer", monkeypatch)
    # the coordinator asks the trainer to save into <runs-dir>/<name>/checkpoint: the same path in both pods
    assert _claim_mounted_at(coordinator_pod, coordinator, run.runs_dir) == "haoping-runs"
    assert _claim_mounted_at(trainer_pod, _container(trainer_pod, "trainer"), run.runs_dir) == "haoping-runs"
    assert Path(trainer.checkpoint_dir).parent == Path(run.runs_dir)
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for name in [*PARSERS, "coordinator"]:
        pod = _workload(objects, name)["spec"]["template"]
        for volume in pod["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_the_trainers_ppo_config_matches_the_coordinators_rollouts(rendered, monkeypatch):
    _, objects = rendered
    trainer_pod = _workload(objects, "trainer")["spec"]["template"]
    ppo = json.loads(_service_args(_container(trainer_pod, "trainer"), "trainer", monkeypatch).ppo_config)
    run = _run_args(_container(_workload(objects, "coordinator")["spec"]["template"], "coordinator"), monkeypatch)
    # EOS is masked by the trainer exactly where the generator masks it, and PPO uses the run's seed
    assert ppo == {"min_response_tokens": run.min_new_tokens, "seed": run.seed}


def test_every_container_has_requests_within_limits(rendered):
    overlay, objects = rendered
    for name in [*PARSERS, "coordinator"]:
        pod = _workload(objects, name)["spec"]["template"]
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request, limit = resources["requests"][resource], resources["limits"][resource]
                assert 0 < _quantity(request) <= _quantity(limit), (name, container["name"], resource)
        main = _container(pod, name)["resources"]["requests"]["memory"]
        assert _quantity(main) >= MEASURED_PEAK_MIB[name] * 2**20, (name, main)
        for init in pod["spec"].get("initContainers", []):
            if init["name"] in MEASURED_PEAK_MIB:
                request = init["resources"]["requests"]["memory"]
                assert _quantity(request) >= MEASURED_PEAK_MIB[init["name"]] * 2**20, (name, request)


@pytest.mark.parametrize("rendered", ["cpu"], indirect=True)
def test_the_cpu_overlay_fits_a_two_core_single_node_cluster(rendered):
    _, objects = rendered

    def pod_request(pod: dict, resource: str) -> float:
        # what the scheduler reserves: the larger of any one init container and all containers together
        init = [_quantity(c["resources"]["requests"][resource]) for c in pod["spec"].get("initContainers", [])]
        main = sum(_quantity(c["resources"]["requests"][resource]) for c in pod["spec"]["containers"])
        return max([main, *init])

    pods = [_workload(objects, name)["spec"]["template"] for name in [*PARSERS, "coordinator"]]
    # a 2-core, 8 GiB kind node keeps about 1 CPU and 1 GiB for its own control plane
    assert sum(pod_request(p, "cpu") for p in pods) <= 1.0
    assert sum(pod_request(p, "memory") for p in pods) <= 6 * 2**30


def _docs_yaml_block(containing: str) -> str:
    """The one fenced yaml block of docs/kubernetes.md that contains `containing`."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs/kubernetes.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, containing
    return found[0]


@needs_kubectl
def test_the_documented_readwritemany_patch_renders_and_validates(tmp_path, token):
    tree = _copy_tree(tmp_path, token)
    overlay = tree / "overlays/rwx"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../cpu]\n"
        + _docs_yaml_block("ReadWriteMany"))
    done = _kustomize(tree, "rwx")
    assert done.returncode == 0, done.stderr
    claims = [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "PersistentVolumeClaim"]
    assert len(claims) == 2
    for claim in claims:
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        kubernetes_validate.validate(claim, SCHEMA_VERSIONS[-1], strict=True)

