"""Guard figures and the learning-benchmark summary, on hand-made inputs."""
import pytest

from bench.learning import TARGETS, rolling_mean, summarize, verdict
from haoping.text_metrics import distinct_n, empty_rate, repetition_rate


def test_text_metrics():
    assert distinct_n(["好好好", "好评"], 2) == pytest.approx(2 / 3)  # 好好, 好好, 好评
    assert repetition_rate(["好好好好", "好好好", "很不错"]) == pytest.approx(1 / 3)
    assert empty_rate(["", " ", "好"]) == pytest.approx(2 / 3)
    assert distinct_n([], 2) == 0.0


def test_summary_times_threshold_crossings_on_the_3_cycle_mean():
    rewards = [0.5, 0.8, 0.9, 0.95, 0.95, 0.97]
    records = [{"cycle": i, "reward_mean": r, "kl": float(i), "seconds": 10.0, "samples": 64,
                "distinct2": 0.8 - 0.1 * i, "repetition_rate": 0.03 * i}
               for i, r in enumerate(rewards)]
    before = [{"response": "不错", "reward": 0.5}, {"response": "很差", "reward": 0.5}]
    after = [{"response": "很好很好", "reward": 0.9}, {"response": "", "reward": 0.9}]
    targets = {**TARGETS, "peer_seconds_to_0_90": 600.0}  # 0.5x: within 300 s
    s = summarize(records, before, after, targets=targets)
    assert rolling_mean(rewards)[4] == pytest.approx((0.9 + 0.95 + 0.95) / 3)
    assert s["seconds_to_reward_0_85"] == 40.0  # cycle 3: 3-mean 0.883
    assert s["seconds_to_reward_0_90"] == 50.0  # cycle 4: 3-mean 0.933
    assert s["kl_at_0_90"] == pytest.approx(3.0)  # mean of kl 2, 3, 4
    assert s["empty_rate_end"] == 0.5 and s["distinct2_start"] == 1.0
    # the guards are read where 0.90 is reached: cycles 2-4
    assert s["distinct2_at_0_90"] == pytest.approx(0.5) and s["repetition_rate_at_0_90"] == pytest.approx(0.09)
    assert s["distinct2_rollouts_start"] == pytest.approx(0.8)
    met = {name: ok for name, _, ok in verdict(s, targets)}
    assert {k: v for k, v in met.items() if "0.90" in k and "held-out" not in k} == {
        "reward 0.90 within 300.0 s of training": True, "KL at 0.90 <= 6 nats/seq": True,
        "distinct-2 at 0.90 >= 0.5x start": True, "repetition rate at 0.90 <= 10%": True}
    never = summarize(records[:2], before, after)
    assert never["seconds_to_reward_0_90"] is None and never["kl_at_0_90"] is None
    assert not any(ok for _, _, ok in verdict(never))
