"""The bench-peer harness's pure pieces: moving mean, threshold crossing, KL, summary, table,
targets; and that the KL it measures for TRL runs is haoping's objective/kl. No TRL needed."""
import json

import pytest
import torch

from bench.peer import metrics


def steps_from(rewards, kls=None, distinct2=None, repetition=None, samples=64, seconds_per_step=2.0):
    n = len(rewards)
    kls = kls or [0.0] * n
    distinct2 = distinct2 or [0.8] * n
    repetition = repetition or [0.0] * n
    return [{"step": i, "seconds": seconds_per_step * (i + 1), "samples": samples, "reward_mean": r, "kl": k,
             "distinct2": d, "repetition_rate": p}
            for i, (r, k, d, p) in enumerate(zip(rewards, kls, distinct2, repetition))]


def test_moving_mean_is_trailing_over_three_with_a_short_start():
    assert metrics.moving_mean([3.0, 6.0, 9.0, 0.0]) == pytest.approx([3.0, 4.5, 6.0, 5.0])
    assert metrics.moving_mean([]) == []


def test_first_crossing_is_the_first_value_at_or_above():
    assert metrics.first_crossing([0.5, 0.9, 0.95], 0.90) == 1
    assert metrics.first_crossing([0.5, 0.89], 0.90) is None


def test_sequence_kl_sums_log_ratio_over_each_rows_tokens():
    logp = [[-1.0, -2.0], [-0.5]]
    ref = [[-1.5, -1.0], [-0.25]]
    assert metrics.sequence_kl(logp, ref) == pytest.approx([0.5 - 1.0, -0.25])
    with pytest.raises(ValueError, match="row 0"):
        metrics.sequence_kl([[-1.0]], [[-1.0, -2.0]])


def test_summary_reads_thresholds_off_the_moving_mean_with_cumulative_samples():
    # raw 0.90 at step 2, but the 3-step mean reaches 0.90 only at step 4: (0.9 + 0.9 + 0.95) / 3
    steps = steps_from([0.5, 0.8, 0.9, 0.9, 0.95, 0.95], kls=[0, 1, 2, 3, 4, 5],
                       distinct2=[0.8, 0.8, 0.8, 0.4, 0.4, 0.4], repetition=[0, 0, 0, 0.3, 0.3, 0.3])
    s = metrics.summarize(steps)
    assert s["samples_per_second"] == pytest.approx(6 * 64 / 12.0)
    assert s["reached"]["0.80"] == {"seconds": 8.0, "samples": 256, "step": 3}  # means 0.5 0.65 0.73 0.87
    assert s["reached"]["0.85"] == s["reached"]["0.80"]
    assert s["reached"]["0.90"] == {"seconds": 10.0, "samples": 320, "step": 4}
    at90 = s["at_0_90"]
    assert at90["kl"] == pytest.approx(3.0)  # (2 + 3 + 4) / 3
    assert at90["distinct2_ratio"] == pytest.approx((0.8 + 0.4 + 0.4) / 3 / 0.8)
    assert at90["repetition_rate"] == pytest.approx(0.2)
    assert s["end"]["kl"] == pytest.approx(4.0)


def test_summary_of_a_run_that_never_gets_there_and_its_heldout_ratio():
    s = metrics.summarize(steps_from([0.5, 0.6]), heldout={"reward_mean": 0.6, "distinct2": 0.4, "repetition_rate": 0},
                          heldout_start={"reward_mean": 0.5, "distinct2": 0.8, "repetition_rate": 0})
    assert s["reached"]["0.90"] is None and s["at_0_90"] is None
    assert s["heldout"]["distinct2_ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.summarize([])


def _summary(seconds_to_90, speed, end_kl=3.0, heldout=0.95):
    steps = steps_from([0.95] * 3, kls=[1.0, 1.0, end_kl], seconds_per_step=seconds_to_90)
    s = metrics.summarize(steps, heldout={"reward_mean": heldout, "distinct2": 0.8, "repetition_rate": 0.0},
                          heldout_start={"reward_mean": 0.5, "distinct2": 0.8, "repetition_rate": 0.0})
    s["samples_per_second"] = speed
    return s


def test_verdict_checks_each_target_against_the_peers_in_the_same_run():
    good = {"haoping-ppo": _summary(1.0, 300), "trl-grpo": _summary(4.0, 130), "trl-ppo": _summary(8.0, 50)}
    rows = metrics.verdict(good, "haoping-ppo")
    assert [met for _, _, met in rows] == [True] * 5
    bad = {"haoping-ppo": _summary(3.0, 90, end_kl=30.0, heldout=0.8), "trl-grpo": _summary(4.0, 130),
           "trl-ppo": _summary(8.0, 50)}
    time_ok, at90_ok, end_ok, heldout_ok, speed_ok = [met for _, _, met in metrics.verdict(bad, "haoping-ppo")]
    assert not time_ok and at90_ok and not end_ok and not heldout_ok and not speed_ok
    missing = metrics.verdict({"haoping-ppo": _summary(1.0, 300)}, "haoping-ppo")
    assert not missing[0][2] and not missing[-1][2]


def test_guards_hold_only_with_all_three_within_bounds():
    ok = {"kl": 5.9, "distinct2_ratio": 0.6, "repetition_rate": 0.05}
    assert metrics.guards_hold(ok)
    assert not metrics.guards_hold({**ok, "kl": 6.1})
    assert not metrics.guards_hold({**ok, "distinct2_ratio": 0.4})
    assert not metrics.guards_hold({**ok, "repetition_rate": 0.11})
    assert not metrics.guards_hold(None)


def test_table_has_a_row_per_run_and_dashes_where_a_threshold_was_never_reached():
    summaries = {"haoping-ppo": _summary(1.0, 300), "trl-ppo": metrics.summarize(steps_from([0.5, 0.6]))}
    text = metrics.table(summaries)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run |")
    assert lines[2].startswith("| haoping-ppo | 300 | 1.0 / 1.0 / 1.0 | 64 |")
    assert lines[3].startswith("| trl-ppo | 32 | - / - / - | - | - |")


def test_haoping_cycles_become_step_records_on_the_sum_of_cycle_times(tmp_path):
    from bench.peer.harness import haoping_steps

    cycles = [{"cycle": i, "seconds": 1.5, "samples": 128, "reward_mean": 0.5 + i / 10, "kl": i,
               "distinct2": 0.8, "repetition_rate": 0.0, "elapsed": 99.0} for i in range(3)]
    path = tmp_path / "cycles.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in cycles))
    steps = haoping_steps(path)
    assert [s["seconds"] for s in steps] == pytest.approx([1.5, 3.0, 4.5])
    assert [s["kl"] for s in steps] == [0, 1, 2] and steps[2]["reward_mean"] == pytest.approx(0.7)


def test_measured_kl_is_the_trainers_objective_kl(tiny_policy):
    """The KL the harness measures for TRL's rollouts is haoping's objective/kl for the same rollouts."""
    from bench.peer.trl_common import haoping_kl
    from haoping.ppo_trainer import PPOConfig, PPOTrainer

    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=4, ppo_epochs=1, min_response_tokens=2))
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its reference, so the KL is not trivially 0
        for p in trainer.model.lm.transformer.h.parameters():
            p.add_(0.2 * torch.randn_like(p))
    eos = trainer.eos_id
    queries = [[2, 10, 11], [2, 12], [2, 13, 14, 15], [2, 12]]
    responses = [[20, 21, eos], [22, 23, 24, 25], [26, 27], [eos + 1, 24, 22]]
    measured = haoping_kl(trainer.model.lm, trainer.ref_model, queries, responses, trainer.tokenizer, 2)
    stats = trainer.step(queries, responses, [0.9, 0.1, 0.5, 0.3])
    assert abs(stats["objective/kl"]) > 1e-3
    assert sum(measured) / len(measured) == pytest.approx(stats["objective/kl"], rel=1e-4, abs=1e-6)


def test_heldout_samples_are_the_same_for_the_same_policy_and_split_over_the_prompts(tiny_policy, tiny_classifier):
    from bench.peer.heldout import evaluate
    from haoping.scorers.classifier import ClassifierScorer

    scorer = ClassifierScorer(str(tiny_classifier))
    prompts = ["刚收到货", "这部电影很"]
    first = evaluate(str(tiny_policy), scorer, prompts, 6, max_new_tokens=4, min_new_tokens=2)
    again = evaluate(str(tiny_policy), scorer, prompts, 6, max_new_tokens=4, min_new_tokens=2)
    other_seed = evaluate(str(tiny_policy), scorer, prompts, 6, max_new_tokens=4, min_new_tokens=2, seed=1)
    assert first["samples"] == 6 and first == again
    assert other_seed["examples"] != first["examples"]
    assert [e[:2] for e in first["examples"]] == ["刚收", "这部", "刚收", "这部"]
