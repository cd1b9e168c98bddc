"""The rank-list labeling page and the human-reward scorer: forms in, rank lists and scores out."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from haoping.scorers import ScoreCancelled, ScoreTimeout
from haoping.scorers.human import HumanScorePage, HumanScorer, TooManyPending, UnknownBatch, stars_to_score
from haoping.labeling import RankingApp, draw_group, generator_service_draw, in_process_draw, start_web_server
from haoping.ranklists import RankListError, append_ranklist, format_ranklist, read_ranklists

PROMPT = "刚收到货，感觉"


# --- HTTP helpers -------------------------------------------------------------------------

def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def http_post(url: str, fields: dict | list) -> tuple[int, str]:
    """POST an urlencoded form; redirects are followed (a saved form answers 303 -> the next page)."""
    data = urllib.parse.urlencode(fields).encode("utf-8")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as reply:
            return reply.status, reply.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def hidden(page: str, name: str) -> str:
    return re.search(rf'name="{name}" value="([^"]*)"', page).group(1)


def shown_texts(page: str) -> list[str]:
    import html

    return [html.unescape(t) for t in re.findall(r'<div class="text">(.*?)</div>', page)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- rank-list writer ---------------------------------------------------------------------

def test_append_ranklist_sanitizes_appends_and_reads_back(tmp_path):
    path = tmp_path / "lists.tsv"
    path.write_bytes("旧的好\t旧的差".encode("utf-8"))  # a hand-edited last line without its newline
    line = append_ranklist(path, ["很好\t很好\n真的", "  一般\r\n般 ", "\ufeff太差了"])
    assert line == "很好 很好 真的\t一般 般\t太差了\n"
    lists, problems = read_ranklists(path, strict=True)
    assert not problems
    assert [rl.texts for rl in lists] == [("旧的好", "旧的差"), ("很好 很好 真的", "一般 般", "太差了")]


@pytest.mark.parametrize("texts", [["只有一条"], ["好", " \t\n"], ["很 好", "很\t好"]],
                         ids=["one text", "empty after sanitizing", "duplicate after sanitizing"])
def test_append_ranklist_refuses_invalid_lists_without_touching_the_file(tmp_path, texts):
    path = tmp_path / "lists.tsv"
    path.write_bytes("甲\t乙\n".encode("utf-8"))
    with pytest.raises(RankListError):
        format_ranklist(texts)
    with pytest.raises(RankListError):
        append_ranklist(path, texts)
    assert path.read_bytes() == "甲\t乙\n".encode("utf-8")


# --- the labeling page --------------------------------------------------------------------

def fake_draw(prompt: str, n: int, seed: int) -> list[str]:
    # distinct per seed; a tab and a newline in one text, as a policy could write them
    return [f"{prompt}第{seed}组\t第{i}条\n好" for i in range(n)]


@pytest.fixture
def labeler(tmp_path):
    out = tmp_path / "ranklists.tsv"
    out.write_bytes("已有的好评\t已有的差评\n".encode("utf-8"))  # saved earlier: must survive
    app = RankingApp(fake_draw, [PROMPT, "这部电影很"], out, k=4, seed=7)
    server = start_web_server(app, "127.0.0.1", 0)
    yield app, server.url, out
    server.shutdown()
    server.server_close()


def test_get_shows_k_texts_of_one_prompt_and_the_saved_count(labeler):
    app, url, _ = labeler
    status, page = http_get(url)
    assert status == 200
    texts = shown_texts(page)
    assert len(texts) == 4 and len(set(texts)) == 4
    assert all(t.startswith(PROMPT) and "\t" not in t and "\n" not in t for t in texts)
    assert page.count('<select name="rank_') == 4
    assert "rank lists in" in page and ": 1</p>" in page  # the line already in the file
    assert http_get(url)[1] == page  # a reload shows the same group, not a new draw


def test_valid_ranking_appends_exactly_one_line_best_first(labeler):
    app, url, out = labeler
    before = out.read_bytes()
    page = http_get(url)[1]
    group, texts = hidden(page, "group"), shown_texts(page)
    ranks = {"rank_0": "3", "rank_1": "1", "rank_2": "4", "rank_3": "2"}
    status, next_page = http_post(url + "rank", {"group": group, "action": "save", **ranks})
    assert status == 200
    after = out.read_bytes()
    assert after.startswith(before)  # appended, never rewritten
    assert after[len(before):].decode("utf-8") == "\t".join([texts[1], texts[3], texts[0], texts[2]]) + "\n"
    lists, problems = read_ranklists(out, strict=True)
    assert not problems and lists[-1].texts == (texts[1], texts[3], texts[0], texts[2])
    assert app.saved == 1
    assert hidden(next_page, "group") != group  # the next group
    assert shown_texts(next_page)[0].startswith("这部电影很")
    assert "Saved this session: 1" in next_page and ": 2</p>" in next_page


BAD_RANKINGS = [
    ("missing rank", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": ""}),
    ("rank field absent", {"rank_0": "1", "rank_1": "2", "rank_2": "3"}),
    ("duplicate rank", {"rank_0": "1", "rank_1": "2", "rank_2": "2", "rank_3": "4"}),
    ("rank out of range", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "5"}),
    ("rank zero", {"rank_0": "0", "rank_1": "2", "rank_2": "3", "rank_3": "1"}),
    ("not a number", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "four"}),
    ("extra rank", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4", "rank_4": "5"}),
]


@pytest.mark.parametrize("name,ranks", BAD_RANKINGS, ids=[c[0] for c in BAD_RANKINGS])
def test_bad_ranking_is_400_and_writes_nothing(labeler, name, ranks):
    app, url, out = labeler
    before = out.read_bytes()
    group = hidden(http_get(url)[1], "group")
    status, page = http_post(url + "rank", {"group": group, "action": "save", **ranks})
    assert status == 400, name
    assert "Nothing was saved" in page
    assert out.read_bytes() == before
    assert app.saved == 0
    assert hidden(http_get(url)[1], "group") == group  # the same group is still open to fix


def test_unknown_repeated_or_resubmitted_group_is_400(labeler):
    app, url, out = labeler
    group = hidden(http_get(url)[1], "group")
    ranks = {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4"}
    for fields, why in [({"group": "deadbeef", **ranks}, "unknown group"),
                        ({"group": group, "action": "delete", **ranks}, "unknown action")]:
        before = out.read_bytes()
        status, page = http_post(url + "rank", fields)
        assert status == 400 and out.read_bytes() == before, why
    # a field given twice
    status, _ = http_post(url + "rank", [("group", group), *ranks.items(), ("rank_0", "2")])
    assert status == 400 and app.saved == 0
    assert http_post(url + "rank", {"group": group, **ranks})[0] == 200
    saved_once = out.read_bytes()
    status, page = http_post(url + "rank", {"group": group, **ranks})  # the browser resubmits
    assert status == 400 and "already saved or skipped" in page
    assert out.read_bytes() == saved_once and app.saved == 1


def test_skip_writes_nothing_and_moves_on(labeler):
    app, url, out = labeler
    before = out.read_bytes()
    page = http_get(url)[1]
    status, next_page = http_post(url + "rank", {"group": hidden(page, "group"), "action": "skip"})
    assert status == 200
    assert out.read_bytes() == before
    assert (app.saved, app.skipped) == (0, 1)
    assert shown_texts(next_page) != shown_texts(page)


def test_concurrent_submissions_of_one_group_save_it_once(labeler):
    app, url, out = labeler
    group = hidden(http_get(url)[1], "group")
    ranks = {"group": group, "rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4"}
    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(s for s, _ in pool.map(lambda _: http_post(url + "rank", ranks), range(8)))
    assert statuses == [200] + [400] * 7
    assert len(read_ranklists(out)[0]) == 2


def test_draw_group_redraws_repeated_samples():
    calls = []

    def repetitive(prompt, n, seed):
        calls.append(seed)
        return [f"{prompt}好"] * (n - 1) + [f"{prompt}第{seed}"]  # mostly one text again and again

    texts = draw_group(repetitive, PROMPT, 3, seed=10)
    assert texts == [f"{PROMPT}好", f"{PROMPT}第10", f"{PROMPT}第11"] and calls == [10, 11]
    with pytest.raises(RuntimeError, match="fewer than 2 distinct"):
        draw_group(lambda p, n, s: [p] * n, PROMPT, 3, seed=0)


def test_in_process_policy_draws_seeded_texts_that_start_with_the_prompt(tiny_policy):
    draw = in_process_draw(str(tiny_policy), max_new_tokens=6, min_new_tokens=6)
    texts = draw_group(draw, PROMPT, 4, seed=3)
    assert len(texts) == 4 and len(set(texts)) == 4
    assert all(t.startswith(PROMPT) and len(t) > len(PROMPT) for t in texts)
    assert draw_group(draw, PROMPT, 4, seed=3) == texts
    assert draw_group(draw, PROMPT, 4, seed=4) != texts


@pytest.mark.slow
def test_generator_service_draws_the_same_seeded_texts_as_the_in_process_policy(tiny_policy, tmp_path):
    from services.coordinator.run import start_service, stop_services

    (tmp_path / "logs").mkdir()
    generator = start_service("generator", ["--model", str(tiny_policy), "--device", "cpu"], tmp_path, timeout=120)
    try:
        texts = draw_group(generator_service_draw(generator.address, 6, 6), PROMPT, 4, seed=3)
    finally:
        stop_services([generator])
    assert len(texts) == 4 and all(t.startswith(PROMPT) for t in texts)
    assert texts == draw_group(in_process_draw(str(tiny_policy), 6, 6), PROMPT, 4, seed=3)


# --- human scorer -------------------------------------------------------------------------

def wait_for_pending(scorer: HumanScorer, count: int = 1, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while len(scorer.pending()) < count:
        assert time.monotonic() < deadline, "score() never queued its texts"
        time.sleep(0.01)
    return scorer.pending()


def test_submitted_stars_are_returned_to_the_blocked_score_call():
    scorer = HumanScorer()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(scorer.score, ["好", "差", "一般"], 30)
        (batch,) = wait_for_pending(scorer)
        assert batch.texts == ("好", "差", "一般") and not future.done()
        scorer.submit(batch.id, [5, 1, 3])
        results = future.result(timeout=10)
    assert [r.score for r in results] == [1.0, 0.0, 0.5]
    assert [r.raw_score for r in results] == [5.0, 1.0, 3.0]
    assert {r.label for r in results} == {"human"}
    assert scorer.pending() == []
    assert [stars_to_score(s) for s in range(1, 6)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_bad_submissions_change_nothing_and_pending_batches_queue_in_order():
    scorer = HumanScorer()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(scorer.score, ["一", "二"], 30)
        wait_for_pending(scorer, 1)
        second = pool.submit(scorer.score, ["三"], 30)
        batches = wait_for_pending(scorer, 2)
        assert [b.texts for b in batches] == [("一", "二"), ("三",)]
        for stars in ([5], [5, 0], [5, 6], [5, 2.5], [5, True]):
            with pytest.raises(ValueError):
                scorer.submit(batches[0].id, stars)
        with pytest.raises(UnknownBatch):
            scorer.submit("nope", [5, 5])
        assert [b.id for b in scorer.pending()] == [b.id for b in batches]
        scorer.submit(batches[1].id, [2])  # any pending batch may be answered, not only the oldest
        assert second.result(timeout=10)[0].score == 0.25
        scorer.submit(batches[0].id, [4, 1])
        assert [r.score for r in first.result(timeout=10)] == [0.75, 0.0]
        with pytest.raises(UnknownBatch):
            scorer.submit(batches[0].id, [4, 1])  # already rated


def test_score_times_out_and_cancels_cleanly():
    scorer = HumanScorer()
    started = time.monotonic()
    with pytest.raises(ScoreTimeout):
        scorer.score(["好"], timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert scorer.pending() == []

    cancelled = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(scorer.score, ["好"], None, cancelled.is_set)
        (batch,) = wait_for_pending(scorer)
        cancelled.set()
        with pytest.raises(ScoreCancelled):
            future.result(timeout=10)
    assert scorer.pending() == []
    with pytest.raises(UnknownBatch):
        scorer.submit(batch.id, [5])


def test_queue_limit():
    scorer = HumanScorer(max_pending=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(scorer.score, ["好"], 30)
        (batch,) = wait_for_pending(scorer)
        with pytest.raises(TooManyPending):
            scorer.score(["差"], timeout=5)
        scorer.submit(batch.id, [3])
        assert future.result(timeout=10)[0].score == 0.5


@pytest.fixture
def rating_page():
    scorer = HumanScorer()
    server = start_web_server(HumanScorePage(scorer), "127.0.0.1", 0)
    yield scorer, server.url
    server.shutdown()
    server.server_close()


def test_rating_page_round_trip_and_bad_forms(rating_page):
    scorer, url = rating_page
    status, page = http_get(url)
    assert status == 200 and "Nothing to rate" in page and 'http-equiv="refresh"' in page
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(scorer.score, ["质量很好", "太差了，<退货>"], 30)
        (batch,) = wait_for_pending(scorer)
        page = http_get(url)[1]
        assert hidden(page, "batch") == batch.id
        assert shown_texts(page) == ["质量很好", "太差了，<退货>"]  # escaped on the page
        assert 'http-equiv="refresh"' not in page  # a form must not reload under the person
        assert json.loads(http_get(url + "pending.json")[1])[0]["texts"] == ["质量很好", "太差了，<退货>"]
        for form in ({"batch": batch.id, "stars_0": "5"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "6"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "x"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "1", "stars_2": "1"},
                     {"batch": "nope", "stars_0": "5", "stars_1": "1"}):
            status, page = http_post(url + "score", form)
            assert status == 400 and "Nothing was saved" in page, form
            assert [b.id for b in scorer.pending()] == [batch.id] and not future.done()
        status, page = http_post(url + "score", {"batch": batch.id, "stars_0": "5", "stars_1": "2"})
        assert status == 200 and "Nothing to rate" in page
        assert [r.score for r in future.result(timeout=10)] == [1.0, 0.25]


# --- through the real scorer service ------------------------------------------------------

@pytest.mark.slow
def test_scorer_service_human_backend(tmp_path):
    from haoping.client import ScorerClient
    from services.coordinator.run import start_service, stop_services

    (tmp_path / "logs").mkdir()
    port = free_port()
    # the model is not loaded by the human backend: a path that does not exist proves it
    scorer = start_service("scorer", ["--backend", "human", "--human-port", str(port), "--device", "cpu",
                                      "--model", str(tmp_path / "no-model"), "--grace-seconds", "1",
                                      "--drain-announce-seconds", "0"], tmp_path, timeout=120)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert "Nothing to rate" in http_get(url)[1]  # warm-up did not leave a batch behind
        with ScorerClient(scorer.address, timeout=60) as client, ThreadPoolExecutor(1) as pool:
            assert client.info().backend == "human"
            future = pool.submit(client.score, ["质量很好", "太差了"])
            deadline = time.monotonic() + 30
            while not (queue := json.loads(http_get(url + "pending.json")[1])):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert queue[0]["texts"] == ["质量很好", "太差了"]
            assert http_post(url + "score", {"batch": queue[0]["id"], "stars_0": "4"})[0] == 400
            assert http_post(url + "score", {"batch": queue[0]["id"], "stars_0": "4", "stars_1": "1"})[0] == 200
            reply = future.result(timeout=30)
            assert [s.score for s in reply.scores] == [0.75, 0.0]
            assert {s.label for s in reply.scores} == {"human"}
            assert (reply.model_id, reply.backend) == ("human", "human")

            with pytest.raises(grpc.RpcError) as err:
                client.stub.Score(_score_request(["好"]), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            _wait_empty(url)  # the timed-out texts left the page

            call = client.stub.Score.future(_score_request(["好"]), timeout=30)
            while not json.loads(http_get(url + "pending.json")[1]):
                time.sleep(0.05)
            call.cancel()
            _wait_empty(url)  # the cancelled texts left the page
    finally:
        stop_services([scorer])


def _score_request(texts):
    from haoping.v1 import haoping_pb2 as pb

    return pb.ScoreRequest(texts=texts)


def _wait_empty(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(http_get(url + "pending.json")[1]):
        assert time.monotonic() < deadline, "texts stayed on the page after their caller left"
        time.sleep(0.05)


@pytest.mark.slow
def test_haoping_label_serves_the_page_from_an_in_process_policy(tiny_policy, tmp_path):
    import subprocess
    import sys

    out, port = tmp_path / "lists.tsv", free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "label", "--policy", str(tiny_policy),
                                "--out", str(out), "--k", "3", "--port", str(port), "--seed", "1",
                                "--device", "cpu", "--prompts", PROMPT],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                status, page = http_get(url)
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "haoping label never served its page"
                time.sleep(0.2)
        texts = shown_texts(page)
        assert status == 200 and len(texts) == 3 and all(t.startswith(PROMPT) for t in texts)
        fields = {"group": hidden(page, "group"), "rank_0": "2", "rank_1": "3", "rank_2": "1"}
        assert http_post(url + "rank", fields)[0] == 200
        assert read_ranklists(out, strict=True)[0][0].texts == (texts[2], texts[0], texts[1])
    finally:
        process.terminate()
        process.wait(30)
