"""Verified checkpoints: manifest, refusal of corrupt / partial / non-finite ones, retention,
the full trainer state round trip, the non-finite rollback and exactly-once steps."""
import copy
import json
import random
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from haoping.checkpoint import (CheckpointError, CheckpointStore, check_label, checkpoint_interval, cycle_label,
                                verify_checkpoint)
from haoping.ppo_trainer import NonFiniteStep, PPOConfig, PPOTrainer

QUERIES = [[2, 10, 11], [2, 12], [2, 10, 11], [2, 13, 14, 15]]
RESPONSES = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]
SCORES = [1.0, -0.5, 0.3, 0.8]


def _write(store: CheckpointStore, label: str, sequence: int, payload: bytes = b"x" * 100) -> None:
    with store.writing(label, sequence) as staging:
        (staging / "data.bin").write_bytes(payload)
        save_file({"w": torch.ones(3)}, staging / "weights.safetensors")


def test_a_checkpoint_is_a_new_verified_directory_with_a_manifest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    _write(store, cycle_label(40), 40)
    path = tmp_path / "checkpoints" / "cycle-000040"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"data.bin", "weights.safetensors"}
    assert manifest["files"]["data.bin"]["size"] == 100 and len(manifest["files"]["data.bin"]["sha256"]) == 64
    assert verify_checkpoint(path)["sequence"] == 40
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["cycle-000040"]  # no temp names left


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("cycle-000001", 1) as staging:
            (staging / "data.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert store.candidates() == [] and store.newest_good() is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "nan", "delete", "manifest", "marker"])
def test_a_damaged_newest_checkpoint_is_refused_moved_aside_and_the_previous_used(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path, keep=5)
    _write(store, "cycle-000010", 10)
    _write(store, "cycle-000020", 20)
    newest = tmp_path / "cycle-000020"
    if damage == "truncate":
        (newest / "data.bin").write_bytes(b"x" * 10)
    elif damage == "flip":
        (newest / "data.bin").write_bytes(b"y" * 100)
    elif damage == "nan":  # a NaN-filled tensor with a manifest that matches it
        save_file({"w": torch.full((3,), float("nan"))}, newest / "weights.safetensors")
        manifest = json.loads((newest / "manifest.json").read_text())
        from haoping.checkpoint import _sha256
        manifest["files"]["weights.safetensors"] = {"size": (newest / "weights.safetensors").stat().st_size,
                                                    "sha256": _sha256(newest / "weights.safetensors")}
        (newest / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "delete":
        (newest / "weights.safetensors").unlink()
    elif damage == "manifest":
        (newest / "manifest.json").write_text('{"format": "haop')
    elif damage == "marker":
        (newest / ".haoping-complete").unlink()
    with pytest.raises(CheckpointError):
        verify_checkpoint(newest)
    assert store.newest_good() == tmp_path / "cycle-000010"
    refused = [p.name for p in tmp_path.iterdir() if ".refused-" in p.name]
    assert len(refused) == 1 and refused[0].startswith("cycle-000020")  # renamed, not deleted
    messages = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(messages) == 1 and "cycle-000020" in messages[0] and "\n" not in messages[0]


def test_only_the_newest_are_kept_and_nothing_else_is_deleted(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    (tmp_path / "cycle-000001").mkdir()  # looks like a checkpoint, was not written by haoping
    for cycle in (10, 20, 30, 40):
        _write(store, cycle_label(cycle), cycle)
        store.prune()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cycle-000001", "cycle-000030", "cycle-000040", "notes"]
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_pruning_waits_for_a_verified_newer_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    _write(store, "cycle-000010", 10)
    _write(store, "cycle-000020", 20)
    (tmp_path / "cycle-000020" / "data.bin").write_bytes(b"bad")
    with pytest.raises(CheckpointError):
        store.prune()
    assert (tmp_path / "cycle-000010").exists()


@pytest.mark.parametrize("label", ["", ".", "..", "../x", "a/b", "x" * 65, ".hidden", "bad label", "ü"])
def test_labels_are_plain_folder_names(label):
    with pytest.raises(ValueError):
        check_label(label)


def test_the_trainer_round_trip_restores_every_rng_and_the_applied_steps(tiny_policy, tmp_path):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=2, reward_normalization=True))
    trainer.apply_step("run:0", QUERIES, RESPONSES, SCORES)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    trainer.save_checkpoint(tmp_path / "cycle-000001")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    resumed = PPOTrainer.from_checkpoint(tmp_path / "cycle-000001")
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert list(resumed.applied_steps) == ["run:0"]
    # the repeated id is answered from the store, without a second update
    stats, version, repeated = resumed.apply_step("run:0", QUERIES, RESPONSES, SCORES)
    assert repeated and version == 1 and resumed.steps_done == 1
    assert stats == pytest.approx(trainer.applied_steps["run:0"]["stats"])
    _, version, repeated = resumed.apply_step("run:1", QUERIES, RESPONSES, SCORES)
    assert not repeated and version == 2 and resumed.steps_done == 2


def test_a_nan_filled_trainer_checkpoint_is_refused_on_load(tiny_policy, tmp_path):
    trainer = PPOTrainer(str(tiny_policy))
    path = trainer.save_checkpoint(tmp_path / "cycle-000000")
    weights = path / "value_head.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    from haoping.checkpoint import _sha256
    manifest = json.loads((path / "manifest.json").read_text())  # a manifest that matches: only finiteness fails
    manifest["files"]["value_head.safetensors"] = {"size": weights.stat().st_size, "sha256": _sha256(weights)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="value_head.safetensors.*non-finite"):
        PPOTrainer.from_checkpoint(path)


def _state(trainer: PPOTrainer) -> dict:
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "kl": trainer.kl_ctl.value,
            "moments": (trainer.score_moments.mean, trainer.score_moments.var, trainer.score_moments.count),
            "counters": (trainer.version, trainer.steps_done), "weights": trainer.policy_weights()[2]}


def test_a_non_finite_update_is_rolled_back_exactly(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=2, reward_normalization=True))
    trainer.apply_step("a", QUERIES, RESPONSES, SCORES)  # optimizer and moments hold state now
    before = _state(trainer)
    poison = trainer.model.value_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    with pytest.raises(NonFiniteStep, match="rolled back"):
        trainer.apply_step("b", QUERIES, RESPONSES, SCORES)
    poison.remove()
    after = _state(trainer)
    assert after["counters"] == before["counters"] and after["kl"] == before["kl"]
    assert after["moments"] == before["moments"] and after["weights"] == before["weights"]
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name
    for pid, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["optimizer"]["state"][pid][key]))
    assert "b" not in trainer.applied_steps
    # and the next good step goes through
    _, version, _ = trainer.apply_step("b", QUERIES, RESPONSES, SCORES)
    assert version == 2


def test_weights_that_turn_non_finite_are_rolled_back(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=4, learning_rate=float("inf")))
    before = trainer.policy_weights()[2]
    with pytest.raises(NonFiniteStep):
        trainer.guarded_step(QUERIES, RESPONSES, SCORES)
    assert trainer.policy_weights()[2] == before and trainer.version == 0


def test_a_rolled_back_first_step_leaves_the_optimizer_without_state(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=4, reward_normalization=True))
    before = _state(trainer)
    poison = trainer.model.value_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    with pytest.raises(NonFiniteStep):
        trainer.guarded_step(QUERIES, RESPONSES, SCORES)
    poison.remove()
    assert not trainer.optimizer.state  # as before any step: Adam starts afresh on the next one
    after = _state(trainer)
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in before["optimizer"]["param_groups"]]


@pytest.mark.slow
def test_the_trainer_service_checkpoints_by_label_and_applies_each_step_id_once(tiny_policy, tmp_path):
    import grpc

    from haoping.client import TrainerClient
    from haoping.v1 import haoping_pb2 as pb
    from services.coordinator.run import start_service, stop_services

    (tmp_path / "logs").mkdir()
    checkpoints = tmp_path / "checkpoints"
    # --max-abs-reward above float32's range: an extreme but finite reward reaches the update
    service = start_service("trainer", ["--model", str(tiny_policy), "--device", "cpu", "--checkpoint-dir",
                                        str(checkpoints), "--keep-checkpoints", "2", "--max-abs-reward", "1e39"],
                            tmp_path, timeout=120)
    token = service.token_file.read_text().strip()
    rollouts = [pb.Rollout(query_token_ids=q, response_token_ids=r, reward=s)
                for q, r, s in zip(QUERIES, RESPONSES, SCORES)]
    try:
        with TrainerClient(service.address, timeout=60, token=token) as trainer:
            for label in ["", ".", "..", "../escape", "a/b", "/tmp/abs", "x" * 65]:
                with pytest.raises(grpc.RpcError) as err:
                    trainer.save_checkpoint(label)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                trainer.stub.SaveCheckpoint(pb.SaveCheckpointRequest(directory=str(tmp_path / "elsewhere"),
                                                                     label="ok"), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "directory" in err.value.details()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["auth-token", "logs"]  # nothing written anywhere

            first = trainer.step(rollouts, step_id="run:0")
            again = trainer.step(rollouts, step_id="run:0")
            assert (first.policy_version, first.repeated) == (1, False)
            assert (again.policy_version, again.repeated) == (1, True) and dict(again.stats) == dict(first.stats)
            with pytest.raises(grpc.RpcError) as err:
                trainer.step(rollouts, step_id="no spaces allowed")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "step_id" in err.value.details()

            weights = b"".join(c.data for c in trainer.stub.GetWeights(pb.GetWeightsRequest(), timeout=30))
            extreme = [pb.Rollout(query_token_ids=q, response_token_ids=r, reward=3e38) for q, r in
                       zip(QUERIES, RESPONSES)]
            with pytest.raises(grpc.RpcError) as err:
                trainer.step(extreme, step_id="run:1")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "non-finite" in err.value.details()
            assert b"".join(c.data for c in trainer.stub.GetWeights(pb.GetWeightsRequest(), timeout=30)) == weights

            for n in range(3):
                saved = trainer.save_checkpoint(f"cycle-00000{n}", b'{"next_cycle": %d}' % n)
                assert saved.label == f"cycle-00000{n}" and saved.steps_done == 1
            # the newest two are kept, verified, with the coordinator's state inside
            assert sorted(p.name for p in checkpoints.iterdir()) == ["cycle-000001", "cycle-000002"]
            verify_checkpoint(checkpoints / "cycle-000002")
            assert json.loads((checkpoints / "cycle-000002" / "coordinator_state.json").read_text()) == {"next_cycle": 2}
            state = json.loads((checkpoints / "cycle-000002" / "trainer_state.json").read_text())
            assert list(state["applied_steps"]) == ["run:0"]
        with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert "haoping_trainer_non_finite_steps_total 1.0" in body
        assert "haoping_trainer_repeated_steps_total 1.0" in body
    finally:
        stop_services([service])
    assert service.process.returncode == 0


def test_the_checkpoint_interval_by_time_stretches_so_checkpoints_stay_a_small_share_of_the_run():
    assert checkpoint_interval(2.0, 0.1, 0.05) == 2.0     # a cheap checkpoint: the flag's interval
    assert checkpoint_interval(2.0, 3.0, 0.05) == 60.0    # 3 s to write: at least 60 s of training between
    assert checkpoint_interval(0.0, 3.0, 0.05) == 0.0     # none by time
    assert checkpoint_interval(2.0, 3.0, 0.0) == 2.0      # no overhead bound
