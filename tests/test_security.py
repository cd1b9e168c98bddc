"""The service surface against callers it cannot trust: tokens on every RPC (a matrix against
running services), LoadWeights peers, request budgets, a property-based fuzz of every RPC
(no UNKNOWN, no crash, nothing changed by a rejected request), TLS, text as sent."""
import math
import re
import socket
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors

from haoping.client import GeneratorClient, ScorerClient, TLSFiles, TrainerClient, make_channel
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from services.coordinator.run import start_service, stop_services

pytestmark = pytest.mark.slow
PROMPT = "刚收到货，感觉"
TINY_CONTEXT = 64  # tests/conftest.py: the tiny policy's n_positions
FUZZ_EXAMPLES = 500
PPO = '{"minibatch_size": 4, "ppo_epochs": 1, "learning_rate": 0.01}'


@pytest.fixture(scope="module")
def secured(tiny_policy, tiny_classifier, tmp_path_factory):
    """A trainer, the generator that pulls from it, a second trainer (not its peer) and a scorer
    that also guards its reads, all with one token in run_dir/auth-token."""
    run_dir = tmp_path_factory.mktemp("secured")
    (run_dir / "logs").mkdir()
    services = []
    try:
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu", "--ppo-config", PPO,
                                                  "--checkpoint-dir", str(run_dir / "ckpt")], run_dir, timeout=120))
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu", "--ppo-config", PPO,
                                                  "--max-rollouts", "16", "--max-step-tokens", "1024",
                                                  "--checkpoint-dir", str(run_dir / "ckpt-2")],
                                      run_dir, timeout=120, label="trainer-2"))
        services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                    "--trainer-address", services[0].address,
                                                    "--max-new-tokens-limit", "40", "--max-samples-per-prompt", "64",
                                                    "--max-prompt-chars", "256", "--max-request-tokens", "2048",
                                                    "--max-queued-tokens", "8192", "--max-wait-ms", "2"],
                                      run_dir, timeout=120))
        services.append(start_service("scorer", ["--model", str(tiny_classifier), "--device", "cpu",
                                                 "--max-texts", "16", "--max-text-chars", "256",
                                                 "--require-token-for-reads"], run_dir, timeout=120))
        token = services[0].token_file.read_text().strip()
        yield SimpleNamespace(trainer=services[0], trainer_2=services[1], generator=services[2], scorer=services[3],
                              token=token, run_dir=run_dir)
    finally:
        stop_services(services)


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def metrics_body(service) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def weights_sha(stub) -> str:
    return next(iter(stub.GetWeights(pb.GetWeightsRequest(), timeout=30))).sha256


# ------------------------------------------------------------------ the auth matrix

# (service, method, request): every RPC of the three services
RPCS = [
    ("trainer", "Step", pb.StepRequest()),  # empty: INVALID_ARGUMENT once past the token check
    ("trainer", "GetWeights", pb.GetWeightsRequest()),
    ("trainer", "SaveCheckpoint", pb.SaveCheckpointRequest()),
    ("trainer", "GetInfo", pb.GetInfoRequest()),
    ("trainer", "OpenWeightGroup", pb.OpenWeightGroupRequest()),  # 0 generators: INVALID_ARGUMENT
    ("trainer", "JoinWeightGroup", pb.JoinWeightGroupRequest()),
    ("trainer", "BroadcastWeights", pb.BroadcastWeightsRequest()),
    ("generator", "LoadWeights", pb.LoadWeightsRequest()),
    ("generator", "JoinWeightGroup", pb.GeneratorJoinWeightGroupRequest()),
    ("generator", "ReceiveWeights", pb.ReceiveWeightsRequest()),
    ("generator", "Generate", pb.GenerateRequest(prompts=[PROMPT], max_new_tokens=2, seed=1)),
    ("generator", "GenerateStream", pb.GenerateRequest(prompts=[PROMPT], max_new_tokens=2, seed=1)),
    ("generator", "GetInfo", pb.GetInfoRequest()),
    ("scorer", "Score", pb.ScoreRequest(texts=["质量很好"])),
    ("scorer", "GetInfo", pb.GetInfoRequest()),
]
PROTECTED = {("trainer", "Step"), ("trainer", "GetWeights"), ("trainer", "SaveCheckpoint"),
             ("trainer", "OpenWeightGroup"), ("trainer", "JoinWeightGroup"), ("trainer", "BroadcastWeights"),
             ("generator", "LoadWeights"), ("generator", "JoinWeightGroup"), ("generator", "ReceiveWeights"),
             ("scorer", "Score"), ("scorer", "GetInfo")}  # the scorer runs with --require-token-for-reads
STUBS = {"trainer": pb_grpc.TrainerStub, "generator": pb_grpc.GeneratorStub, "scorer": pb_grpc.ScorerStub}


@pytest.mark.parametrize("service,method,request_message", RPCS, ids=[f"{s}.{m}" for s, m, _ in RPCS])
def test_every_rpc_without_a_wrong_and_with_the_right_token(secured, service, method, request_message):
    address = getattr(secured, service).address
    codes = {}
    for name, token in (("none", None), ("wrong", secured.token[:-1] + "x"), ("right", secured.token)):
        channel = make_channel(address, token)
        try:
            call = getattr(STUBS[service](channel), method)
            codes[name] = code_of(lambda: call(request_message, timeout=60))
        finally:
            channel.close()
    refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    if (service, method) in PROTECTED:
        assert codes["none"] == codes["wrong"] == grpc.StatusCode.UNAUTHENTICATED, codes
    else:
        assert codes["none"] not in refused and codes["wrong"] not in refused, codes
    assert codes["right"] not in refused, codes  # past the check: the handler answered
    assert codes["right"] != grpc.StatusCode.UNKNOWN, codes


def test_health_and_reflection_stay_open_and_refusals_are_counted(secured):
    for service in (secured.trainer, secured.generator, secured.scorer):
        with grpc.insecure_channel(service.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with TrainerClient(secured.trainer.address) as anonymous:
        code = code_of(lambda: anonymous.stub.Step(pb.StepRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    body = metrics_body(secured.trainer)
    assert re.search(r'haoping_auth_failures_total\{method="Step",reason="missing",service="trainer"\} [1-9]', body)


def test_the_token_is_in_a_private_file_and_never_on_a_command_line(secured):
    assert secured.trainer.token_file.stat().st_mode & 0o777 == 0o600
    for service in (secured.trainer, secured.generator, secured.scorer):
        command_line = open(f"/proc/{service.process.pid}/cmdline", "rb").read().decode()
        assert secured.token not in command_line and "--auth-token-file" in command_line
        assert secured.token not in service.log_path.read_text()


# ------------------------------------------------------------------ peers

def test_load_weights_dials_only_the_configured_trainer(secured):
    listener = socket.socket()  # a port that records any connection made to it
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    trap = f"127.0.0.1:{listener.getsockname()[1]}"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    try:
        with GeneratorClient(secured.generator.address, token=secured.token) as generator:
            version = generator.info().policy_version
            for peer in (secured.trainer_2.address, trap, closed_port, "localhost:1", "[::1]:22"):
                with pytest.raises(grpc.RpcError) as refused:
                    generator.load_weights(peer)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, peer
                assert "--trainer-address" in refused.value.details()
            with pytest.raises(socket.timeout):
                listener.accept()  # nothing dialed the trap
            assert generator.info().policy_version == version
            assert generator.load_weights(secured.trainer.address).policy_version >= version  # the configured one
    finally:
        listener.close()
    assert 'method="GetWeights"' not in metrics_body(secured.trainer_2)  # the second trainer was never asked


# ------------------------------------------------------------------ budgets

def test_an_oversized_generate_is_refused_at_once_and_small_ones_keep_their_deadlines(secured):
    huge = pb.GenerateRequest(prompts=[PROMPT] * 256, samples_per_prompt=64, max_new_tokens=40, seed=1)
    small = pb.GenerateRequest(prompts=[PROMPT], samples_per_prompt=2, max_new_tokens=8, seed=2)
    with GeneratorClient(secured.generator.address) as client:
        def timed(request, timeout):
            started = time.monotonic()
            try:
                client.stub.Generate(request, timeout=timeout)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
            return code, details, time.monotonic() - started

        with ThreadPoolExecutor(9) as pool:
            big = pool.submit(timed, huge, 120)
            smalls = [pool.submit(timed, small, 10) for _ in range(8)]
            code, details, seconds = big.result()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and seconds < 5, (code, seconds)
            assert "--max-request-tokens" in details  # refused for its own size, not for a busy queue
            assert [f.result()[0] for f in smalls] == [grpc.StatusCode.OK] * 8
        info = client.info()
    assert info.limits["max_request_tokens"] == 2048 and info.limits["max_queued_tokens"] == 8192


def test_the_queue_is_bounded_in_work(secured):
    """Eight requests of 2048 tokens each against a budget of 8192: some wait, the rest are told at once."""
    request = pb.GenerateRequest(prompts=[PROMPT] * 8, samples_per_prompt=8, max_new_tokens=32, seed=3)
    def call(_):
        try:
            client.stub.Generate(request, timeout=120)
            return "OK"
        except grpc.RpcError as err:
            return f"{err.code().name} {'--max-queued-tokens' in err.details()}"

    with GeneratorClient(secured.generator.address) as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(8)))
    assert "OK" in codes and "RESOURCE_EXHAUSTED True" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED True"}, codes


def _peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_step_is_rejected_before_it_allocates(secured):
    big = pb.StepRequest(rollouts=[pb.Rollout(query_token_ids=[1] * 20, response_token_ids=[5] * 40, reward=0.5)
                                   for _ in range(20000)])  # 1.2M tokens: GBs of activations if it ran
    # 16 rollouts (the most) of 64 tokens (the context) are 1024 tokens, the budget; one more token is over
    over_tokens = pb.StepRequest(rollouts=[pb.Rollout(query_token_ids=[1] * 30, response_token_ids=[5] * 34,
                                                      reward=0.5) for _ in range(16)])
    over_tokens.rollouts[-1].query_token_ids.append(1)
    with TrainerClient(secured.trainer_2.address, token=secured.token) as trainer:
        sha, version = weights_sha(trainer.stub), trainer.info().policy_version
        peak = _peak_rss_kb(secured.trainer_2.process.pid)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            trainer.stub.Step(big, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-rollouts" in refused.value.details()
        assert time.monotonic() - started < 10
        # the parse itself costs a few tens of MB; running the step would cost far more
        assert _peak_rss_kb(secured.trainer_2.process.pid) - peak < 200_000
        with pytest.raises(grpc.RpcError) as over:
            trainer.stub.Step(over_tokens, timeout=60)
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-step-tokens" in over.value.details()
        assert weights_sha(trainer.stub) == sha and trainer.info().policy_version == version
        limits = trainer.info().limits
    assert limits["max_rollouts"] == 16 and limits["max_step_tokens"] == 1024 and limits["max_abs_reward"] == 100


STEP_CASES = [
    ("longer than the context", [1] * 40, [5] * 30, 0.5, "model context"),
    ("empty response", [1, 2], [], 0.5, "empty response"),
    ("NaN reward", [1, 2], [5], math.nan, "reward"),
    ("extreme reward", [1, 2], [5], 1e30, "reward"),
    ("token outside the vocabulary", [1, 2], [10**6], 0.5, "vocabulary"),
    ("negative token", [-1, 2], [5], 0.5, "vocabulary"),
]


@pytest.mark.parametrize("name,query,response,reward,words", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_bad_rollouts_are_invalid_arguments_that_name_the_rollout(secured, name, query, response, reward, words):
    good = pb.Rollout(query_token_ids=[1, 2], response_token_ids=[5, 6], reward=0.5)
    request = pb.StepRequest(rollouts=[good, pb.Rollout(query_token_ids=query, response_token_ids=response,
                                                        reward=reward)])
    with TrainerClient(secured.trainer_2.address, token=secured.token) as trainer:
        sha = weights_sha(trainer.stub)
        with pytest.raises(grpc.RpcError) as refused:
            trainer.stub.Step(request, timeout=60)
        assert weights_sha(trainer.stub) == sha
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert "rollout 1" in refused.value.details() and words in refused.value.details(), refused.value.details()


def test_score_and_generate_refuse_empty_and_oversized_texts_before_tokenizing(secured):
    with ScorerClient(secured.scorer.address, token=secured.token) as scorer:
        for texts, words in (([" "], "text 0 is empty"), (["好", "好" * 257], "text 1 has 257 characters")):
            with pytest.raises(grpc.RpcError) as refused:
                scorer.score(texts)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            scorer.score(["好" * 1_000_000])
        assert time.monotonic() - started < 2  # rejected by size, not after tokenizing a megabyte
        assert scorer.info().limits["max_text_chars"] == 256
    with GeneratorClient(secured.generator.address) as generator:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            generator.generate(["好" * 1_000_000], max_new_tokens=2)
        assert time.monotonic() - started < 2  # a megabyte prompt is refused by size, untokenized
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 256" in refused.value.details()


# ------------------------------------------------------------------ text as sent

def test_full_text_is_the_prompt_as_sent_plus_a_clean_continuation(secured):
    prompts = ["Hello, this product", "好评😀", "a" * 200, "刚收到货，感觉 ", "ipad mini"]
    with GeneratorClient(secured.generator.address) as client:
        reply = client.generate(prompts, n=2, max_new_tokens=8, seed=5)
        streamed = list(client.generate_stream(prompts, n=2, max_new_tokens=8, seed=5))
    for sample in reply.samples:
        prompt = prompts[sample.prompt_index]
        assert sample.full_text == prompt + sample.text
        assert not re.search(r"[^\x00-\x7f] [^\x00-\x7f]", sample.text), sample.text
        for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
            assert special not in sample.text
    finals = {(p.prompt_index, p.sample_index): p for p in streamed if p.finished}
    for sample in reply.samples:
        key = (sample.prompt_index, sample.sample_index)
        assert "".join(p.text_delta for p in streamed if (p.prompt_index, p.sample_index) == key) == sample.text
        assert finals[key].sample.full_text == sample.full_text


# ------------------------------------------------------------------ the fuzz

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
int32 = st.one_of(st.integers(-3, 70), st.integers(-2**31, 2**31 - 1))
uint32 = st.one_of(st.integers(0, 70), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))
float32 = st.one_of(st.floats(-2, 2, width=32), st.floats(width=32))
texts = st.one_of(st.sampled_from([PROMPT, "这部电影很", "", " ", "Hello, this product", "好评😀"]),
                  st.text(max_size=40), st.text(min_size=250, max_size=300))


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def generate_requests(draw):
    """A third within the limits (they must answer OK), a third valid but over the generator's
    --max-request-tokens (2048: RESOURCE_EXHAUSTED), a third anywhere in the fields' wire ranges."""
    kind = draw(st.sampled_from(["within", "too-large", "wire"]))
    if kind != "wire":
        max_new = draw(st.integers(1, 8)) if kind == "within" else 40  # the fixture's --max-new-tokens-limit
        request = pb.GenerateRequest(prompts=draw(st.lists(st.sampled_from([PROMPT, "这部电影很", "Hello, this product",
                                                                           "好评😀"]), min_size=1, max_size=3)),
                                     samples_per_prompt=draw(st.integers(1, 4) if kind == "within"
                                                             else st.integers(52, 64)),  # 52 x 40 > 2048
                                     max_new_tokens=max_new,
                                     temperature=draw(st.floats(0, 2, width=32)), top_k=draw(st.integers(0, 10)),
                                     top_p=draw(st.floats(0.0625, 1.0, width=32)), seed=draw(uint64),
                                     min_new_tokens=draw(st.integers(0, max_new)),
                                     first_sample_index=draw(st.integers(0, 2**32 - 65)))
        return request
    request = pb.GenerateRequest(prompts=draw(st.lists(texts, max_size=4)), top_k=draw(int32),
                                 min_new_tokens=draw(int32), first_sample_index=draw(uint32))
    for field, strategy in (("samples_per_prompt", int32), ("max_new_tokens", int32), ("temperature", float32),
                            ("top_p", float32), ("seed", uint64)):
        value = draw(optional(strategy))
        if value is not None:
            setattr(request, field, value)
    if draw(st.integers(0, 10)) == 0:  # now and then, far too much work
        request.prompts.extend([PROMPT] * 200)
    return request


token_ids = st.one_of(st.integers(0, 80), int32)


@st.composite
def step_requests(draw):
    rollouts = draw(st.lists(st.builds(
        lambda q, r, reward, version: pb.Rollout(query_token_ids=q, response_token_ids=r, reward=reward,
                                                 policy_version=version),
        st.lists(token_ids, max_size=40), st.lists(token_ids, max_size=40),
        st.one_of(st.floats(-1, 1, width=32), float32, st.sampled_from([100.0, -100.0, 100.5])), uint64),
        max_size=18))
    return pb.StepRequest(rollouts=rollouts)


def _fuzz(strategy, call, allowed=lambda code: code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
          ) -> Counter:
    """``call`` on FUZZ_EXAMPLES drawn requests; every answer's code must be ``allowed``
    (by default: anything but UNKNOWN and INTERNAL, which would mean a handler missed a case)."""
    codes: Counter = Counter()

    @FUZZ
    @given(strategy)
    def one(request):
        code = call(request)
        assert allowed(code), (code, request)
        codes[code] += 1

    one()
    assert sum(codes.values()) >= FUZZ_EXAMPLES
    return codes


def test_fuzzed_generator_requests_get_statuses_not_crashes_and_change_nothing(secured):
    fixed = pb.GenerateRequest(prompts=[PROMPT, "这部电影很"], samples_per_prompt=3, max_new_tokens=8, seed=42)
    with GeneratorClient(secured.generator.address, token=secured.token, timeout=60) as client:
        before = client.stub.Generate(fixed, timeout=60)
        generated = _fuzz(generate_requests(), lambda r: code_of(lambda: client.stub.Generate(r, timeout=60)))
        streamed = _fuzz(generate_requests(), lambda r: code_of(lambda: client.stub.GenerateStream(r, timeout=60)))
        peers = st.one_of(st.just(""), st.just(secured.trainer.address), st.just(secured.trainer_2.address),
                          st.text(max_size=30))
        loads = _fuzz(st.builds(lambda a, v: pb.LoadWeightsRequest(trainer_address=a, version=v), peers, uint64),
                      lambda r: code_of(lambda: client.stub.LoadWeights(r, timeout=60)))
        after = client.stub.Generate(fixed, timeout=60)
        assert client.health_status() == "SERVING"
    for codes in (generated, streamed):
        assert codes[grpc.StatusCode.OK] >= 20 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 20, codes
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 50, codes  # a third is over --max-request-tokens
    assert loads[grpc.StatusCode.PERMISSION_DENIED] >= 20 and loads[grpc.StatusCode.OK] >= 1, loads
    assert [s.response_token_ids for s in after.samples] == [s.response_token_ids for s in before.samples]
    assert [s.full_text for s in after.samples] == [s.full_text for s in before.samples]
    assert secured.generator.process.poll() is None


def test_fuzzed_scorer_requests(secured):
    with ScorerClient(secured.scorer.address, token=secured.token) as client:
        codes = _fuzz(st.builds(lambda t: pb.ScoreRequest(texts=t), st.lists(texts, max_size=20)),
                      lambda r: code_of(lambda: client.stub.Score(r, timeout=60)))
        assert client.health_status() == "SERVING"
    assert codes[grpc.StatusCode.OK] >= 20 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 20, codes


def test_fuzzed_steps_never_change_the_trainer_when_rejected_and_keep_it_finite(secured):
    with TrainerClient(secured.trainer_2.address, token=secured.token) as trainer:
        state = {"sha": weights_sha(trainer.stub)}

        def step(request):
            code = code_of(lambda: trainer.stub.Step(request, timeout=60))
            sha = weights_sha(trainer.stub)
            if code != grpc.StatusCode.OK:
                assert sha == state["sha"], (code, request)  # a rejected Step changed nothing
            state["sha"] = sha
            return code

        codes = _fuzz(step_requests(), step)
        weights = _fuzz(st.builds(lambda v: pb.GetWeightsRequest(version=v), uint64),
                        lambda r: code_of(lambda: trainer.stub.GetWeights(r, timeout=60)))
        # this trainer keeps no --local-weights-dir: as_local_file is FAILED_PRECONDITION, whatever the version
        files = _fuzz(st.builds(lambda v: pb.GetWeightsRequest(version=v, as_local_file=True), uint64),
                      lambda r: code_of(lambda: trainer.stub.GetWeights(r, timeout=60)))
        data = b"".join(c.data for c in trainer.stub.GetWeights(pb.GetWeightsRequest(), timeout=60))
        assert trainer.health_status() == "SERVING"
    assert codes[grpc.StatusCode.OK] >= 5 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 20, codes
    assert weights[grpc.StatusCode.NOT_FOUND] >= 20 and weights[grpc.StatusCode.OK] >= 1, weights
    assert set(files) == {grpc.StatusCode.FAILED_PRECONDITION}, files
    for name, tensor in load_safetensors(data).items():
        assert bool(torch.isfinite(tensor).all()), name


GET_INFO = [("trainer", "/haoping.v1.Trainer/GetInfo"), ("generator", "/haoping.v1.Generator/GetInfo"),
            ("scorer", "/haoping.v1.Scorer/GetInfo")]


@pytest.mark.parametrize("service,method", GET_INFO, ids=[s for s, _ in GET_INFO])
def test_fuzzed_bytes_to_get_info(secured, service, method):
    """GetInfo takes no fields: the fuzz sends arbitrary bytes as its request message."""
    channel = make_channel(getattr(secured, service).address, secured.token)
    try:
        call = channel.unary_unary(method)  # bytes in, bytes out

        def send(raw: bytes):
            try:
                call(raw, timeout=30)
            except grpc.RpcError as err:
                # bytes that are no protobuf message: grpc's own answer, before any handler runs
                return "undecodable" if err.details() == "Exception deserializing request!" else err.code()
            return grpc.StatusCode.OK

        codes = _fuzz(st.binary(max_size=64), send,
                      allowed=lambda code: code in ("undecodable", grpc.StatusCode.OK))
    finally:
        channel.close()
    assert codes[grpc.StatusCode.OK] >= 1, codes


# ------------------------------------------------------------------ metrics

def test_each_service_exports_only_its_own_collectors(secured):
    bodies = {name: metrics_body(getattr(secured, name)) for name in ("trainer", "generator", "scorer")}
    assert "haoping_trainer_kl_nats" in bodies["trainer"]
    assert "haoping_generated_tokens_total" in bodies["generator"]
    assert "haoping_scored_texts_total" in bodies["scorer"]
    for name in ("generator", "scorer"):
        assert "haoping_trainer_" not in bodies[name], name
    for name in ("trainer", "scorer"):
        assert "haoping_generated_" not in bodies[name] and "haoping_weight_load" not in bodies[name], name
    for name in ("trainer", "generator"):
        assert "haoping_scored_texts" not in bodies[name] and "haoping_score_" not in bodies[name], name


# ------------------------------------------------------------------ TLS

def _make_pki(directory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all made now."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("haoping test CA")).issuer_name(name("haoping test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"haoping {role}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, directory / f"{role}-key.pem")
    return directory


def test_mutual_tls_between_clients_generator_and_trainer(tiny_policy, tmp_path):
    (tmp_path / "logs").mkdir()
    pki = _make_pki(tmp_path)
    tls_flags = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server-key.pem"),
                 "--tls-ca", str(pki / "ca.pem")]
    services = []
    try:
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu", *tls_flags],
                                      tmp_path, timeout=120))
        services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                    "--trainer-address", services[0].address, *tls_flags],
                                      tmp_path, timeout=120))
        trainer, generator = services
        client_tls = TLSFiles(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client-key.pem"))
        with GeneratorClient(generator.address, token_file=generator.token_file, tls=client_tls) as client:
            assert client.generate([PROMPT], max_new_tokens=2, seed=1).samples
            assert client.load_weights().policy_version == 0  # generator -> trainer over mutual TLS, with the token
            assert client.health_status() == "SERVING"
        with GeneratorClient(generator.address, token_file=generator.token_file) as plaintext:
            assert code_of(lambda: plaintext.generate([PROMPT], max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        no_client_cert = TLSFiles(ca=str(pki / "ca.pem"))
        with GeneratorClient(generator.address, token_file=generator.token_file, tls=no_client_cert) as anonymous:
            assert code_of(lambda: anonymous.generate([PROMPT], max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        with TrainerClient(trainer.address, tls=client_tls) as tokenless:  # TLS does not replace the token
            assert code_of(lambda: tokenless.stub.Step(pb.StepRequest(), timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_services(services)


@pytest.mark.parametrize("service", ["generator", "scorer", "trainer"])
def test_a_service_refuses_flags_that_cannot_serve_safely_before_loading_a_model(service, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"services.{service}.server").main
    token = tmp_path / "token"
    token.write_text("t\n")
    for flags, words in ((["--tls-ca", str(token)], "--tls-ca"), (["--tls-cert", str(token)], "--tls-key"),
                         (["--require-token-for-reads"], "--require-token-for-reads"),
                         (["--auth-token-file", str(token), "--insecure-no-auth"], "contradict"),
                         (["--auth-token-file", str(tmp_path / "missing")], "--auth-token-file")):
        with pytest.raises(SystemExit) as exited:
            main(["--model", str(tmp_path / "no-such-model"), *flags])  # it would fail to load: never reached
        assert exited.value.code == 2, flags
        assert words in capsys.readouterr().err, flags


def test_haoping_run_says_what_is_wrong_with_a_token_file_and_exits_2(tmp_path, capsys):
    import argparse

    from services.coordinator.run import add_run_flags, run

    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--runs-dir", str(tmp_path), "--name", "x", "--auth-token-file", str(tmp_path / "nope"),
                              "--trainer-address", "t:1", "--generator-addresses", "g:1", "--scorer-address", "s:1"])
    assert run(args) == 2
    assert "--auth-token-file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started


def test_haoping_run_against_running_services_with_a_wrong_token_exits_2(secured, tmp_path, capsys):
    import argparse

    from services.coordinator.run import add_run_flags, run

    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--runs-dir", str(tmp_path / "runs"), "--name", "x", "--auth-token-file", str(wrong),
                              "--trainer-address", secured.trainer.address,
                              "--generator-addresses", secured.generator.address,
                              "--scorer-address", secured.scorer.address])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--auth-token-file" in err and "not-the-token" not in err


def test_sample_indices_beyond_uint32_are_refused_before_generating(secured):
    with GeneratorClient(secured.generator.address) as generator:
        with pytest.raises(grpc.RpcError) as refused:
            generator.generate([PROMPT], n=2, max_new_tokens=2, first_sample_index=2**32 - 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first_sample_index" in refused.value.details()
        last = generator.generate([PROMPT], n=1, max_new_tokens=2, first_sample_index=2**32 - 1, seed=1)
        assert last.samples[0].sample_index == 2**32 - 1
