"""End to end: the real services as processes, PPO cycles through gRPC, metrics, the run dir."""
import json
import re
import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import pytest

from haoping.client import GeneratorClient, GeneratorReplicas, ScorerClient, TrainerClient
from haoping.v1 import haoping_pb2 as pb
from services.coordinator.run import DEFAULT_PROMPTS, Coordinator, start_service, stop_services

pytestmark = pytest.mark.slow
SPACE_NEXT_TO_CJK = re.compile(r"[^\x00-\x7f] | [^\x00-\x7f]")


def assert_clean_text(text: str) -> None:
    """No special tokens, no spaces between Chinese characters (Latin words keep theirs)."""
    assert not SPACE_NEXT_TO_CJK.search(text), text
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
        assert special not in text, text
FAST_PPO = json.dumps({"learning_rate": 0.01, "minibatch_size": 8})


@pytest.fixture(scope="module")
def stack(tiny_policy, tiny_classifier, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    (run_dir / "logs").mkdir()
    services = []
    try:
        # generator 1 shares the trainer's weight folder; generator 2 names one the trainer does not write
        services.append(start_service("trainer", ["--model", str(tiny_policy), "--ppo-config", FAST_PPO,
                                                  "--device", "cpu", "--checkpoint-dir", str(run_dir / "checkpoints"),
                                                  "--local-weights-dir", str(run_dir / "weight-files")],
                                      run_dir, timeout=120))
        services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                    "--trainer-address", services[0].address,
                                                    "--local-weights-dir", str(run_dir / "weight-files")],
                                      run_dir, timeout=120))
        services.append(start_service("scorer", ["--model", str(tiny_classifier), "--device", "cpu"], run_dir,
                                      timeout=120))
        services.append(start_service("generator", ["--model", str(tiny_policy), "--device", "cpu",
                                                    "--trainer-address", services[0].address,
                                                    "--local-weights-dir", str(run_dir / "not-shared")], run_dir,
                                      timeout=120, label="generator-2"))
        yield SimpleNamespace(trainer=services[0], generator=services[1], scorer=services[2],
                              generator_2=services[3], run_dir=run_dir)
    finally:
        stop_services(services)
        for s in services:
            assert s.process.returncode == 0, f"{s.name} did not exit cleanly:\n{s.log_tail()}"


def test_cycles_advance_policy_and_change_seeded_outputs(stack):
    args = SimpleNamespace(prompts=DEFAULT_PROMPTS, samples_per_prompt=4, max_new_tokens=8, eval_samples=8, seed=0,
                           cycles=2, max_seconds=0.0, min_new_tokens=0, empty_response_reward=0.0, max_kl=6.0,
                           min_distinct2_ratio=0.5, max_repetition_rate=0.1)
    token = dict(token_file=stack.trainer.token_file)
    with GeneratorClient(stack.generator.address, **token) as gen, ScorerClient(stack.scorer.address, **token) as scorer, \
            TrainerClient(stack.trainer.address, **token) as trainer:
        before = gen.generate(DEFAULT_PROMPTS, n=4, max_new_tokens=8, seed=123)
        assert {s.policy_version for s in before.samples} == {0}
        coordinator = Coordinator(args, gen, scorer, trainer, stack.trainer.address, stack.run_dir)
        records = coordinator.run()
        assert [r["policy_version"] for r in records] == [1, 2]
        assert gen.info().policy_version == 2
        after = gen.generate(DEFAULT_PROMPTS, n=4, max_new_tokens=8, seed=123)
        assert {s.policy_version for s in after.samples} == {2}
        assert [s.response_token_ids for s in before.samples] != [s.response_token_ids for s in after.samples]
        for sample in [*before.samples, *after.samples]:
            assert_clean_text(sample.full_text)
    for name in ("cycles.jsonl", "samples_before.jsonl", "samples_after.jsonl", "reward_kl.png"):
        assert (stack.run_dir / name).exists(), name
    assert (stack.run_dir / "checkpoints" / "cycle-000002" / "policy" / "model.safetensors").exists()


def test_every_metrics_endpoint_answers(stack):
    expected = {"trainer": ["haoping_trainer_reward_mean", "haoping_trainer_kl_nats", "haoping_policy_version"],
                "generator": ["haoping_generated_tokens_total", "haoping_requests_total"],
                "scorer": ["haoping_scored_texts_total", "haoping_request_duration_seconds_bucket"]}
    for service in (stack.trainer, stack.generator, stack.scorer):
        with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
            body = response.read().decode()
        for metric in expected[service.name]:
            assert metric in body, f"{service.name} lacks {metric}"


def test_haoping_run_writes_the_run_directory(tiny_policy, tiny_classifier, tmp_path):
    command = [sys.executable, "-m", "services.cli", "run", "--policy", str(tiny_policy),
               "--scorer-model", str(tiny_classifier), "--cycles", "2", "--samples-per-prompt", "2",
               "--max-new-tokens", "6", "--min-new-tokens", "2", "--eval-samples", "8", "--runs-dir", str(tmp_path), "--name", "e2e",
               "--ppo-config", FAST_PPO, "--device", "cpu", "--generator-replicas", "2",
               "--generator-dtype", "bfloat16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "latest"
    assert run_dir.resolve() == (tmp_path / "e2e").resolve()
    cycles = [json.loads(line) for line in (run_dir / "cycles.jsonl").read_text().splitlines()]
    assert [c["cycle"] for c in cycles] == [0, 1]
    for key in ("reward_mean", "kl", "policy_version", "seconds"):
        assert all(key in c for c in cycles), key
    for name in ("samples_before.jsonl", "samples_after.jsonl"):
        rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        assert len(rows) >= 8 and {"prompt", "text", "reward"} <= set(rows[0])
        for row in rows:
            assert_clean_text(row["text"])
    assert (run_dir / "reward_kl.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "cycle-000002" / "policy" / "config.json").exists()
    generator_log = (run_dir / "logs" / "generator-2.log").read_text()
    assert "Generator serving" in generator_log  # the second replica
    # the generators sample in bfloat16 beside the float32 trainer, and take its weights from the run's folder
    assert "in bfloat16" in generator_log and "by file" in generator_log and "by stream" not in generator_log
    assert list((run_dir / "weight-files").glob("policy-v2-*.safetensors"))
    assert "cycle   1" in result.stdout
    # the trainer masks EOS exactly where the generator did
    assert json.loads((run_dir / "config.json").read_text())["min_new_tokens"] == 2
    # a second run with the same name continues it (here: nothing left to do) instead of overwriting
    written = {name: (run_dir / name).read_text() for name in ("cycles.jsonl", "samples_before.jsonl", "config.json")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "continuing run e2e from checkpoint" in again.stdout, again.stdout + again.stderr
    assert {name: (run_dir / name).read_text() for name in written} == written
    # a differing flag that may not change is refused
    differing = subprocess.run(command + ["--seed", "7"], capture_output=True, text=True, timeout=120)
    assert differing.returncode == 2 and "--seed" in differing.stderr


def test_generator_replicas_split_rollouts_and_all_load_new_weights(stack, tmp_path):
    args = SimpleNamespace(prompts=DEFAULT_PROMPTS, samples_per_prompt=3, max_new_tokens=6, eval_samples=4, seed=0,
                           cycles=2, max_seconds=0.0, min_new_tokens=2, empty_response_reward=0.0, max_kl=6.0,
                           min_distinct2_ratio=0.5, max_repetition_rate=0.1)
    request = dict(n=3, max_new_tokens=6, min_new_tokens=2, seed=5)
    token = dict(token_file=stack.trainer.token_file)
    with GeneratorReplicas([GeneratorClient(g.address, **token) for g in (stack.generator, stack.generator_2)]) \
            as replicas, ScorerClient(stack.scorer.address, **token) as scorer, \
            TrainerClient(stack.trainer.address, **token) as trainer:
        start_version = replicas.load_weights(stack.trainer.address).policy_version
        assert [(first, count) for _, first, count in replicas.shards(3)] == [(0, 2), (2, 1)]
        split = replicas.generate(DEFAULT_PROMPTS, **request)
        whole = replicas.clients[0].generate(DEFAULT_PROMPTS, **request)
        # a sample's seed is (seed, prompt, sample index): the split changes no sample, nor the order
        assert len(split.samples) == 12
        assert [(s.prompt_index, s.sample_index, s.response_token_ids) for s in split.samples] == \
            [(s.prompt_index, s.sample_index, s.response_token_ids) for s in whole.samples]
        records = Coordinator(args, replicas, scorer, trainer, stack.trainer.address, tmp_path).run()
        assert [r["policy_version"] for r in records] == [start_version + 1, start_version + 2]
        # each rollout came from replicas that all held the previous update
        assert [r["rollout_policy_version"] for r in records] == [start_version, start_version + 1]
        assert [client.info().policy_version for client in replicas.clients] == [start_version + 2] * 2


def test_a_generator_sharing_the_trainers_folder_reads_the_weight_file_and_one_that_cannot_streams(stack):
    token = dict(token_file=stack.trainer.token_file)
    request = dict(n=2, max_new_tokens=6, min_new_tokens=6, seed=11)
    with GeneratorClient(stack.generator.address, **token) as sharing, \
            GeneratorClient(stack.generator_2.address, **token) as streaming, \
            TrainerClient(stack.trainer.address, **token) as trainer:
        before = sharing.generate(DEFAULT_PROMPTS[:1], **request)
        rollouts = [pb.Rollout(query_token_ids=s.prompt_token_ids, response_token_ids=s.response_token_ids,
                               reward=float(i % 2)) for i, s in enumerate(before.samples)]
        version = trainer.step(rollouts).policy_version
        by_file, by_stream = sharing.load_weights(), streaming.load_weights()
        assert (by_file.transport, by_stream.transport) == ("file", "stream")
        assert by_file.policy_version == by_stream.policy_version == version
        assert by_file.bytes == by_stream.bytes > 0 and set(by_file.phase_seconds) == {"fetch", "load"}
        weights = b"".join(c.data for c in trainer.stub.GetWeights(pb.GetWeightsRequest(), timeout=60))
        written = list((stack.run_dir / "weight-files").glob(f"policy-v{version}-*.safetensors"))
        assert len(written) == 1 and written[0].read_bytes() == weights
        assert not (stack.run_dir / "not-shared").exists()
        # both now serve the trainer's new weights: the same samples, and not the old ones
        after = sharing.generate(DEFAULT_PROMPTS[:1], **request)
        assert [s.response_token_ids for s in after.samples] == \
            [s.response_token_ids for s in streaming.generate(DEFAULT_PROMPTS[:1], **request).samples]
        assert {s.policy_version for s in after.samples} == {version}
    assert "come by stream, not through --local-weights-dir" in stack.generator_2.log_path.read_text()


def test_haoping_run_rejects_bad_flags_before_starting_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "run", "--max-new-tokens", "4",
                             "--min-new-tokens", "8", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--min-new-tokens" in result.stderr
    result = subprocess.run([sys.executable, "-m", "services.cli", "run", "--generator-replicas", "0",
                             "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--generator-replicas" in result.stderr
