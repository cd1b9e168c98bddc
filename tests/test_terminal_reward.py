"""Human reward typed in the terminal: the TerminalScorer alone over a pipe, and `haoping run
--scorer-backend human --human-ui terminal` driven through a pseudo-terminal with tiny models."""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest

from haoping.scorers import ScoreCancelled, ScoreTimeout
from haoping.scorers.terminal import HumanStopped, LocalScorerClient, TerminalScorer, parse_stars

ROOT = Path(__file__).resolve().parents[1]
ASK = r"reward \(1-5, q"  # the question before every entry
BAD = "type a whole number from 1 to 5"


# --- the scorer over a pipe -----------------------------------------------------------------

@pytest.fixture
def typed():
    """(scorer, type) where type(text) writes what the person types; the pipe closes at the end."""
    read_fd, write_fd = os.pipe()
    output = io.StringIO()
    yield TerminalScorer(read_fd, output), lambda text: os.write(write_fd, text.encode("utf-8")), output
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_parse_stars():
    assert [parse_stars(s) for s in ("1", " 5 ", "３", "５\r")] == [1, 5, 3, 5]
    assert all(parse_stars(s) is None for s in ("", "0", "6", "2.5", "-1", "五", "x", "1 2"))


def test_each_text_is_shown_and_a_bad_entry_is_asked_again(typed):
    scorer, type_, output = typed
    type_("7\nabc\n\n4\n１\n")
    results = scorer.score(["质量很好", "太差了"], timeout=10)
    assert [r.score for r in results] == [0.75, 0.0]
    assert [r.raw_score for r in results] == [4.0, 1.0] and {r.label for r in results} == {"human"}
    shown = output.getvalue()
    assert "[1/2] 质量很好" in shown and "[2/2] 太差了" in shown
    assert shown.count(BAD) == 3 and shown.count("reward (1-5") == 5
    assert "'7'" in shown and "'abc'" in shown


def test_q_or_end_of_input_stops_and_a_last_line_without_newline_counts(typed):
    scorer, type_, _ = typed
    type_("q\n")
    with pytest.raises(HumanStopped, match="typed q"):
        scorer.score(["好"], timeout=10)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"2\n5")
    os.close(write_fd)
    piped = TerminalScorer(read_fd, io.StringIO())
    assert [r.raw_score for r in piped.score(["一", "二"], timeout=10)] == [2.0, 5.0]
    with pytest.raises(HumanStopped, match="input ended"):
        piped.score(["三"], timeout=10)
    os.close(read_fd)


def test_timeout_and_cancellation_are_honoured_while_waiting(typed):
    scorer, _, _ = typed
    started = time.monotonic()
    with pytest.raises(ScoreTimeout):
        scorer.score(["好"], timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    cancelled = threading.Event()
    threading.Timer(0.2, cancelled.set).start()
    with pytest.raises(ScoreCancelled):
        scorer.score(["好"], timeout=10, is_cancelled=cancelled.is_set)


def test_ctrl_c_ends_the_prompt_line_and_reaches_the_caller(typed, monkeypatch):
    scorer, _, output = typed

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("haoping.scorers.terminal.select.select", interrupted)
    with pytest.raises(KeyboardInterrupt):  # `haoping run` turns it into exit code 130
        scorer.score(["好"], timeout=10)
    assert output.getvalue().endswith("quit): \n")


def test_local_client_answers_like_the_scorer_service(typed):
    scorer, type_, _ = typed
    type_("5\n2\n")
    with LocalScorerClient(scorer, timeout=10) as client:
        reply = client.score(["好", "差"])
    assert [s.score for s in reply.scores] == [1.0, 0.25] and [s.raw_score for s in reply.scores] == [5.0, 2.0]
    assert (reply.backend, reply.model_id) == ("human", "human-terminal")


# --- haoping run in a pseudo-terminal -------------------------------------------------------

def run_command(tiny_policy, tmp_path, cycles: int, name: str = "terminal") -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", "--scorer-backend", "human", "--human-ui", "terminal",
            "--policy", str(tiny_policy), "--cycles", str(cycles), "--samples-per-prompt", "1",
            "--prompts", "刚收到货，感觉", "这部电影很", "--eval-samples", "2", "--max-new-tokens", "4",
            "--min-new-tokens", "2", "--runs-dir", str(tmp_path), "--name", name, "--device", "cpu",
            "--ppo-config", json.dumps({"learning_rate": 0.01}), "--score-timeout", "120"]


def spawn(command: list[str]) -> pexpect.spawn:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(command[0], command[1:], cwd=str(ROOT), env=env, encoding="utf-8", timeout=120,
                         dimensions=(50, 200))


def rate(child: pexpect.spawn, entry: str) -> None:
    child.expect(ASK)
    child.sendline(entry)


def finish(child: pexpect.spawn) -> tuple[int, str]:
    try:
        child.expect(pexpect.EOF, timeout=120)
    except pexpect.TIMEOUT:
        raise AssertionError(f"haoping run did not end; its terminal:\n{child.before}") from None
    child.close()
    return child.exitstatus, child.before


@pytest.mark.slow
def test_haoping_run_takes_each_reward_from_the_terminal_and_steps_on_each_batch(tiny_policy, tmp_path):
    child = spawn(run_command(tiny_policy, tmp_path, cycles=2))
    transcript = []
    try:
        child.expect("Human reward: give each text 1 to 5 stars")
        # samples before training: 2 texts; bad entries are asked again
        for bad in ("7", "abc", ""):
            rate(child, bad)
            child.expect(BAD)
        rate(child, "5")
        rate(child, "1")
        rate(child, "5")  # cycle 0: 5, 5 -> mean 1.0
        rate(child, "5")
        child.expect("cycle   0")
        transcript.append(child.before)
        rate(child, "1")  # cycle 1: 1, 3 -> mean 0.25
        rate(child, "3")
        child.expect("cycle   1")
        rate(child, "4")  # samples after training
        rate(child, "2")
        status, rest = finish(child)
    finally:
        child.terminate(force=True)
    output = "".join(transcript) + rest
    assert status == 0, output
    assert "Traceback" not in output and "mean reward" in output
    run_dir = tmp_path / "terminal"
    cycles = [json.loads(line) for line in (run_dir / "cycles.jsonl").read_text().splitlines()]
    assert [c["cycle"] for c in cycles] == [0, 1]
    assert [c["env/score_mean"] for c in cycles] == [1.0, 0.25]  # exactly the typed stars
    assert [c["policy_version"] for c in cycles] == [1, 2]  # one PPO step on each full batch
    assert [c["samples"] for c in cycles] == [2, 2]
    before = [json.loads(line)["reward"] for line in (run_dir / "samples_before.jsonl").read_text().splitlines()]
    after = [json.loads(line)["reward"] for line in (run_dir / "samples_after.jsonl").read_text().splitlines()]
    assert (before, after) == ([1.0, 0.0], [0.75, 0.25])
    assert not (run_dir / "logs" / "scorer.log").exists()  # no scorer service: the terminal is the scorer
    assert (run_dir / "checkpoints" / "cycle-000002" / "policy" / "config.json").exists()


@pytest.mark.slow
def test_end_of_input_stops_cleanly_and_keeps_the_policy(tiny_policy, tmp_path):
    child = spawn(run_command(tiny_policy, tmp_path, cycles=5))
    try:
        for entry in ("3", "3", "4", "4"):  # the samples before, then cycle 0
            rate(child, entry)
        child.expect("cycle   0")
        child.expect(ASK)  # cycle 1 asks; the person presses Ctrl-D
        child.sendeof()
        status, output = finish(child)
    finally:
        child.terminate(force=True)
    assert status == 0, output
    assert "stopped: the input ended" in output and "1 cycle(s) done" in output and "Traceback" not in output
    run_dir = tmp_path / "terminal"
    assert [json.loads(line)["cycle"] for line in (run_dir / "cycles.jsonl").read_text().splitlines()] == [0]
    assert json.loads((run_dir / "checkpoints" / "cycle-000001" / "trainer_state.json").read_text())["version"] == 1


def test_terminal_mode_refuses_without_a_terminal_or_the_human_backend(tmp_path, capsys, monkeypatch):
    import argparse

    from services.coordinator.run import add_run_flags, run, running_services

    def args(*argv):
        parser = argparse.ArgumentParser()
        add_run_flags(parser)
        return parser.parse_args(["--runs-dir", str(tmp_path), "--name", "x", "--human-ui", "terminal", *argv])

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal
    assert run(args("--scorer-backend", "human")) == 2
    assert "needs a terminal on standard input" in capsys.readouterr().err
    assert run(args()) == 2 and "needs --scorer-backend human" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # with running services, the terminal takes the scorer's place: no --scorer-address
    trainer, generators, scorers = running_services(args("--scorer-backend", "human", "--trainer-address", "t:1",
                                                         "--generator-addresses", "g:1"))
    assert (trainer, [g.text for g in generators], scorers) == ("t:1", ["g:1"], [])
    with pytest.raises(ValueError, match="not used with --human-ui terminal"):
        running_services(args("--scorer-backend", "human", "--trainer-address", "t:1", "--generator-addresses", "g:1",
                              "--scorer-address", "s:1"))
