"""The rank-list labeling page and the human-reward scorer: forms in, rank lists and scores out."""
from __future__ import annotations

import http.cookiejar
import json
import re
import socket
import subprocess
import sys
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
from haoping.labeling import STRINGS as RANKING_STRINGS
from haoping.labeling import RankingApp, draw_group, generator_service_draw, in_process_draw
from haoping.ranklists import (RankListError, append_ranklist, format_ranklist, line_digest, read_lines,
                               read_ranklists, remove_line, removed_path)
from haoping.scorers.human import STRINGS as RATING_STRINGS
from haoping.webpage import start_web_server

PROMPT = "刚收到货，感觉"


# --- HTTP helpers -------------------------------------------------------------------------

class Browser:
    """One person: urllib with its own cookie jar. Redirects are followed (a saved form answers
    303 -> the next page)."""

    def __init__(self):
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def _open(self, request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=30) as reply:
                return reply.status, reply.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8")

    def get(self, url: str) -> tuple[int, str]:
        return self._open(url)

    def post(self, url: str, fields: dict | list) -> tuple[int, str]:
        return self._open(urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode("utf-8")))


def http_get(url: str) -> tuple[int, str]:
    return Browser().get(url)


def http_post(url: str, fields: dict | list) -> tuple[int, str]:
    return Browser().post(url, fields)


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

POOL = [PROMPT, "这部电影很"]


def fake_draw(prompt: str, n: int, seed: int) -> list[str]:
    # distinct per seed; a tab and a newline in one text, as a policy could write them
    return [f"{prompt}第{seed}组\t第{i}条\n好" for i in range(n)]


@pytest.fixture
def labeler(tmp_path):
    out = tmp_path / "ranklists.tsv"
    out.write_bytes("已有的好评\t已有的差评\n".encode("utf-8"))  # saved earlier: must survive
    app = RankingApp(fake_draw, POOL, out, k=4, seed=7, max_prompt_chars=20)
    server = start_web_server(app, "127.0.0.1", 0)
    yield app, server.url, out
    server.shutdown()
    server.server_close()


def shown_prompt(page: str) -> str:
    import html

    return html.unescape(re.search(r'<p class="meta">(?:提示：|Prompt: )(.*?)</p>', page).group(1))


def test_get_shows_k_texts_of_one_prompt_and_the_saved_count(labeler):
    app, url, _ = labeler
    person = Browser()
    status, page = person.get(url + "?lang=en")
    assert status == 200
    texts = shown_texts(page)
    assert len(texts) == 4 and len(set(texts)) == 4
    assert shown_prompt(page) in POOL and all(t.startswith(shown_prompt(page)) for t in texts)
    assert all("\t" not in t and "\n" not in t for t in texts)
    assert page.count('<select name="rank_') == 4
    assert "rank lists in" in page and ": 1</p>" in page  # the line already in the file
    assert person.get(url + "?lang=en")[1] == page  # a reload shows the same group, not a new draw
    other = Browser().get(url + "?lang=en")[1]
    assert hidden(other, "group") != hidden(page, "group")  # another person has their own group


def test_pages_are_chinese_by_default_and_english_on_request(labeler):
    _, url, _ = labeler
    person = Browser()
    zh = person.get(url)[1]
    assert '<html lang="zh-CN">' in zh and "<h1>给评论排序</h1>" in zh and "保存排序" in zh
    assert 'href="/?lang=en"' in zh and 'action="/rank"' in zh
    en = person.get(url + "?lang=en")[1]
    assert '<html lang="en">' in en and "<h1>Rank the reviews</h1>" in en and "Save ranking" in en
    assert 'action="/rank?lang=en"' in en and 'href="/dataset?lang=en"' in en  # the language is kept
    assert hidden(en, "group") == hidden(zh, "group")
    assert "<h1>数据集</h1>" in person.get(url + "dataset")[1]
    assert "<h1>Dataset</h1>" in person.get(url + "dataset?lang=en")[1]
    status, page = person.post(url + "rank", {"group": hidden(zh, "group"), "rank_0": "1"})
    assert status == 400 and "什么都没有保存" in page and "<h1>未保存</h1>" in page


@pytest.mark.parametrize("strings", [RANKING_STRINGS, RATING_STRINGS], ids=["labeling", "rating"])
def test_every_string_has_both_languages_with_the_same_placeholders(strings):
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for key, (zh, en) in strings.table.items():
        assert zh.strip() and en.strip(), key
        zh_names, en_names = strings.placeholders(key)
        assert zh_names == en_names, key
        if key != "other_language":
            assert cjk.search(zh) and not cjk.search(en), key
    assert RANKING_STRINGS("zh", "other_language") == "English" and RANKING_STRINGS("en", "other_language") == "中文"


def test_valid_ranking_appends_exactly_one_line_best_first(labeler):
    app, url, out = labeler
    person = Browser()
    before = out.read_bytes()
    page = person.get(url + "?lang=en")[1]
    group, texts = hidden(page, "group"), shown_texts(page)
    ranks = {"rank_0": "3", "rank_1": "1", "rank_2": "4", "rank_3": "2"}
    status, next_page = person.post(url + "rank?lang=en", {"group": group, "action": "save", **ranks})
    assert status == 200
    after = out.read_bytes()
    assert after.startswith(before)  # appended, never rewritten
    assert after[len(before):].decode("utf-8") == "\t".join([texts[1], texts[3], texts[0], texts[2]]) + "\n"
    lists, problems = read_ranklists(out, strict=True)
    assert not problems and lists[-1].texts == (texts[1], texts[3], texts[0], texts[2])
    assert app.totals()["saved"] == 1
    assert hidden(next_page, "group") != group  # the next group
    assert shown_prompt(next_page) in POOL
    assert "You saved 1, skipped 0" in next_page and ": 2</p>" in next_page
    assert "You saved 0" in Browser().get(url + "?lang=en")[1]  # counted for this person only


BAD_RANKINGS = [
    ("missing rank", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": ""}),
    ("rank field absent", {"rank_0": "1", "rank_1": "2", "rank_2": "3"}),
    ("duplicate rank", {"rank_0": "1", "rank_1": "2", "rank_2": "2", "rank_3": "4"}),
    ("rank out of range", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "5"}),
    ("rank zero", {"rank_0": "0", "rank_1": "2", "rank_2": "3", "rank_3": "1"}),
    ("not a number", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "four"}),
    ("full-width digit", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "４"}),
    ("extra rank", {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4", "rank_4": "5"}),
]


@pytest.mark.parametrize("name,ranks", BAD_RANKINGS, ids=[c[0] for c in BAD_RANKINGS])
def test_bad_ranking_is_400_and_writes_nothing(labeler, name, ranks):
    app, url, out = labeler
    person = Browser()
    before = out.read_bytes()
    group = hidden(person.get(url)[1], "group")
    status, page = person.post(url + "rank?lang=en", {"group": group, "action": "save", **ranks})
    assert status == 400, name
    assert "Nothing was saved" in page
    assert out.read_bytes() == before
    assert app.totals()["saved"] == 0
    assert hidden(person.get(url)[1], "group") == group  # the same group is still open to fix


def test_duplicate_ranks_message_names_the_rank_in_both_languages(labeler):
    _, url, _ = labeler
    person = Browser()
    group = hidden(person.get(url)[1], "group")
    ranks = {"group": group, "rank_0": "1", "rank_1": "2", "rank_2": "2", "rank_3": "4"}
    assert "名次 2 给了不止一条文本" in person.post(url + "rank", ranks)[1]
    assert "rank(s) 2 given to more than one text" in person.post(url + "rank?lang=en", ranks)[1]


def test_unknown_repeated_or_resubmitted_group_is_400(labeler):
    app, url, out = labeler
    person = Browser()
    group = hidden(person.get(url)[1], "group")
    ranks = {"rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4"}
    for fields, why in [({"group": "deadbeef", **ranks}, "unknown group"),
                        ({"group": group, "action": "delete", **ranks}, "unknown action")]:
        before = out.read_bytes()
        status, page = person.post(url + "rank", fields)
        assert status == 400 and out.read_bytes() == before, why
    # a field given twice
    status, _ = person.post(url + "rank", [("group", group), *ranks.items(), ("rank_0", "2")])
    assert status == 400 and app.totals()["saved"] == 0
    assert person.post(url + "rank", {"group": group, **ranks})[0] == 200
    saved_once = out.read_bytes()
    status, page = person.post(url + "rank?lang=en", {"group": group, **ranks})  # the browser resubmits
    assert status == 400 and "already saved or skipped" in page
    assert out.read_bytes() == saved_once and app.totals()["saved"] == 1


def test_skip_writes_nothing_and_moves_on(labeler):
    app, url, out = labeler
    person = Browser()
    before = out.read_bytes()
    page = person.get(url)[1]
    status, next_page = person.post(url + "rank", {"group": hidden(page, "group"), "action": "skip"})
    assert status == 200
    assert out.read_bytes() == before
    assert (app.totals()["saved"], app.totals()["skipped"]) == (0, 1)
    assert shown_texts(next_page) != shown_texts(page)


def test_concurrent_submissions_of_one_group_save_it_once(labeler):
    app, url, out = labeler
    person = Browser()
    group = hidden(person.get(url)[1], "group")
    ranks = {"group": group, "rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4"}
    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(s for s, _ in pool.map(lambda _: person.post(url + "rank", ranks), range(8)))
    assert statuses == [200] + [400] * 7
    assert len(read_ranklists(out)[0]) == 2


def test_typed_and_random_prompts(labeler):
    app, url, out = labeler
    person = Browser()
    first = hidden(person.get(url)[1], "group")
    status, page = person.post(url + "prompt?lang=en", {"prompt": "  我自己的\t提示 ", "action": "typed"})
    assert status == 200 and shown_prompt(page) == "我自己的 提示"
    assert all(t.startswith("我自己的 提示") for t in shown_texts(page)) and len(shown_texts(page)) == 4
    typed_group = hidden(page, "group")
    assert typed_group != first
    assert person.post(url + "rank", {"group": first, "action": "skip"})[0] == 400  # replaced, no longer open
    for prompt, message in [(" \t ", "the prompt is empty"), ("太" * 21, "the prompt has 21 characters; at most 20")]:
        status, page = person.post(url + "prompt?lang=en", {"prompt": prompt, "action": "typed"})
        assert status == 400 and message in page
        assert hidden(person.get(url)[1], "group") == typed_group  # unchanged
    assert person.post(url + "prompt", {"prompt": "好", "action": "both"})[0] == 400
    status, page = person.post(url + "prompt", {"prompt": "", "action": "random"})
    assert status == 200 and shown_prompt(page) in POOL and hidden(page, "group") != typed_group
    assert Browser().post(url + "prompt", {"prompt": "好"})[0] == 400  # no cookie: not a known person
    assert out.read_bytes() == "已有的好评\t已有的差评\n".encode("utf-8")


def dataset_rows(page: str) -> list[tuple[int, list[str], str]]:
    """(line, texts, digest) of each row of the dataset view, newest first."""
    import html

    rows = []
    for number, cell, digest in re.findall(r'<tr id="line_(\d+)"><td>\d+</td><td>(.*?)</td>.*?'
                                           r'name="digest" value="([0-9a-f]+)"', page):
        rows.append((int(number), [html.unescape(t) for t in re.findall(r"<li>(.*?)</li>", cell)], digest))
    return rows


def test_dataset_view_counts_lists_and_shows_the_last_ones(labeler):
    app, url, out = labeler
    out.write_bytes(out.read_bytes() + "只有一条\n".encode("utf-8")
                    + "".join(f"甲{i}\t乙{i}\n" for i in range(25)).encode("utf-8"))
    person = Browser()
    page = person.get(url + "?lang=en")[1]
    ranks = {"group": hidden(page, "group"), "rank_0": "2", "rank_1": "1", "rank_2": "3", "rank_3": "4"}
    texts = shown_texts(page)
    person.post(url + "rank", ranks)
    view = person.get(url + "dataset?lang=en")[1]
    assert "holds 27 rank lists; you saved 1 of them and removed 0" in view
    assert "1 more line(s) cannot be read" in view
    rows = dataset_rows(view)
    assert len(rows) == 20 and rows[0][0] == 28 and rows[-1][0] == 9
    assert rows[0][1] == [texts[1], texts[0], texts[2], texts[3]]
    assert rows[1][1] == ["甲24", "乙24"]
    zh = person.get(url + "dataset")[1]
    assert "中共有 27 条排序列表，其中你保存了 1 条" in zh


def test_remove_moves_the_line_to_the_removed_log_and_rewrites_the_file(labeler):
    app, url, out = labeler
    out.write_bytes(out.read_bytes() + "好一\t差一\n好二\t差二\n".encode("utf-8"))
    person = Browser()
    view = person.get(url + "dataset?lang=en")[1]
    token = hidden(view, "token")
    (line, texts, digest), = [row for row in dataset_rows(view) if row[1] == ["好一", "差一"]]
    assert line == 2
    inode = out.stat().st_ino
    status, after = person.post(url + "remove?lang=en", {"token": token, "line": "2", "digest": digest})
    assert status == 200 and "Removed line 2; it is kept in" in after
    assert out.read_bytes() == "已有的好评\t已有的差评\n好二\t差二\n".encode("utf-8")
    assert out.stat().st_ino != inode  # replaced by rename, not edited in place
    stamp, removed = removed_path(out).read_text(encoding="utf-8").rstrip("\n").split("\t", 1)
    assert removed == "好一\t差一" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert "you saved 0 of them and removed 1" in after
    before = out.read_bytes()
    for fields, why in [({"token": token, "line": "2", "digest": digest}, "removed already"),
                        ({"token": "0" * 32, "line": "2", "digest": line_digest("好二\t差二".encode())}, "wrong token"),
                        ({"token": "令牌", "line": "2", "digest": line_digest("好二\t差二".encode())}, "non-ASCII token"),
                        ({"token": token, "line": "x", "digest": digest}, "bad line number"),
                        ({"token": token, "line": "2", "digest": "zz"}, "bad digest")]:
        status, page = person.post(url + "remove?lang=en", fields)
        assert status == 400 and "Nothing was saved" in page, why
        assert 'href="/dataset?lang=en">Back</a>' in page and 'href="/dataset">中文</a>' in page, why
        assert out.read_bytes() == before, why
    assert Browser().post(url + "remove", {"token": token, "line": "2", "digest": digest})[0] == 400  # no cookie
    assert removed_path(out).read_text(encoding="utf-8").count("\n") == 1


def test_remove_line_finds_the_line_after_lines_above_it_went(tmp_path):
    path = tmp_path / "lists.tsv"
    path.write_bytes("a\tb\nc\td\ne\tf\n".encode())
    digest = line_digest(b"e\tf")
    assert remove_line(path, 1, line_digest(b"a\tb")).number == 1
    removed = remove_line(path, 3, digest)  # asked for line 3; it is line 2 now
    assert removed.number == 2 and removed.raw == b"e\tf"
    assert path.read_bytes() == b"c\td\n"
    assert remove_line(path, 3, digest) is None
    assert [line.split("\t", 1)[1] for line in removed_path(path).read_text().splitlines()] == ["a\tb", "e\tf"]


WRITER = """
import sys
from haoping.ranklists import append_ranklist
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(count):
    append_ranklist(path, [f"{name}好{i}", f"{name}差{i}"])
"""


def test_concurrent_writers_in_threads_and_processes_never_lose_or_corrupt_a_line(tmp_path):
    path = tmp_path / "shared.tsv"
    per_writer = 150
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"进程{p}", str(per_writer)])
                 for p in range(2)]

    def thread_writer(name: str) -> None:
        for i in range(per_writer):
            append_ranklist(path, [f"{name}好{i}", f"{name}差{i}"])

    removed: list[bytes] = []

    def remover() -> None:  # rewrites the file again and again while the others append
        deadline = time.monotonic() + 30
        while len(removed) < 40 and time.monotonic() < deadline:
            lines = read_lines(path)
            if len(lines) > 5:
                line = lines[len(lines) // 2]
                if remove_line(path, line.number, line.digest) is not None:
                    removed.append(line.raw)
            time.sleep(0.002)

    threads = [threading.Thread(target=thread_writer, args=(f"线程{t}",)) for t in range(2)]
    threads.append(threading.Thread(target=remover))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for process in processes:
        assert process.wait(60) == 0
    assert len(removed) >= 10  # the rewrites really raced the appends

    written = {f"{name}好{i}\t{name}差{i}" for name in ("进程0", "进程1", "线程0", "线程1") for i in range(per_writer)}
    lists, problems = read_ranklists(path, strict=True)  # every line whole
    kept = ["\t".join(rl.texts) for rl in lists]
    log = [line.split("\t", 1)[1] for line in removed_path(path).read_text(encoding="utf-8").splitlines()]
    assert sorted(log) == sorted(raw.decode() for raw in removed)
    assert sorted(kept + log) == sorted(written)  # each line exactly once: kept or in the removed log


def test_a_generator_that_does_not_answer_is_a_clear_503(tmp_path):
    app = RankingApp(generator_service_draw(f"127.0.0.1:{free_port()}", 4, 2, timeout=2), POOL, tmp_path / "l.tsv")
    server = start_web_server(app, "127.0.0.1", 0)
    try:
        status, page = Browser().get(server.url + "?lang=en")
        assert status == 503 and "cannot generate texts now: generator 127.0.0.1:" in page and "UNAVAILABLE" in page
        assert Browser().get(server.url + "healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "l.tsv").exists()


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
    status, page = http_get(url + "?lang=en")
    assert status == 200 and "Nothing to rate" in page and 'http-equiv="refresh"' in page
    zh = http_get(url)[1]
    assert '<html lang="zh-CN">' in zh and "<h1>给评论打分</h1>" in zh and "现在没有要打分的文本" in zh
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(scorer.score, ["质量很好", "太差了，<退货>"], 30)
        (batch,) = wait_for_pending(scorer)
        page = http_get(url + "?lang=en")[1]
        assert hidden(page, "batch") == batch.id
        assert "提交评分" in http_get(url)[1] and "Submit ratings" in page
        assert shown_texts(page) == ["质量很好", "太差了，<退货>"]  # escaped on the page
        assert 'http-equiv="refresh"' not in page  # a form must not reload under the person
        assert json.loads(http_get(url + "pending.json")[1])[0]["texts"] == ["质量很好", "太差了，<退货>"]
        for form in ({"batch": batch.id, "stars_0": "5"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "6"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "x"},
                     {"batch": batch.id, "stars_0": "5", "stars_1": "1", "stars_2": "1"},
                     {"batch": "nope", "stars_0": "5", "stars_1": "1"}):
            status, page = http_post(url + "score?lang=en", form)
            assert status == 400 and "Nothing was saved" in page, form
            assert [b.id for b in scorer.pending()] == [batch.id] and not future.done()
        status, page = http_post(url + "score?lang=en", {"batch": batch.id, "stars_0": "5", "stars_1": "2"})
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
        assert "Nothing to rate" in http_get(url + "?lang=en")[1]  # warm-up did not leave a batch behind
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
