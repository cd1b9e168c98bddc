"""The labeling page and the rating page in a real browser: Debian's headless Chromium driven by
selenium, against a real generator service and a real scorer service (human backend), tiny models.

Screenshots of every page land in tests/output/browser/. Without Chromium the test is skipped
(`apt-get install chromium chromium-driver fonts-noto-cjk`); .ci/run installs them and sets
HAOPING_REQUIRE_BROWSER=1, so in CI a missing browser fails instead."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from haoping.labeling import RankingApp, generator_service_draw
from haoping.ranklists import read_lines, removed_path
from haoping.webpage import start_web_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parent / "output" / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1000,1100", "--lang=zh-CN"]


def _missing_browser() -> str:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver fonts-noto-cjk)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return ""


if _missing_browser():
    if os.environ.get("HAOPING_REQUIRE_BROWSER"):
        raise RuntimeError(f"HAOPING_REQUIRE_BROWSER is set but {_missing_browser()}")
    pytest.skip(_missing_browser(), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="haoping-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def services(tiny_policy, tmp_path_factory):
    """A generator service with the tiny policy and a scorer service with the human backend."""
    from services.coordinator.run import start_service, stop_services

    work = tmp_path_factory.mktemp("browser-services")
    (work / "logs").mkdir()
    rating_port = free_port()
    with ThreadPoolExecutor(2) as pool:  # both start at once
        generator = pool.submit(start_service, "generator", ["--model", str(tiny_policy), "--device", "cpu"],
                                work, 120)
        scorer = pool.submit(start_service, "scorer", ["--backend", "human", "--human-port", str(rating_port),
                                                       "--device", "cpu", "--grace-seconds", "1",
                                                       "--drain-announce-seconds", "0"], work, 120)
        started = [generator.result(), scorer.result()]
    try:
        yield started[0], started[1], f"http://127.0.0.1:{rating_port}/"
    finally:
        stop_services(started)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def texts_on(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".item .text")]


def navigates(driver, action) -> None:
    """Do ``action`` (a click or a key that submits a form) and wait until the next page is loaded."""
    old = driver.find_element(By.TAG_NAME, "html")
    action()
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def badges(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".item .badge")]


def test_rank_save_refuse_remove_and_rate_in_a_real_browser(browser, services, tmp_path):
    generator, scorer, rating_url = services
    out = tmp_path / "ranklists.tsv"
    out.write_bytes("已有的好评\t已有的差评\n".encode("utf-8"))
    app = RankingApp(generator_service_draw(generator.address, max_new_tokens=6, min_new_tokens=4),
                     ["刚收到货，感觉", "这部电影很"], out, k=4, seed=3)
    server = start_web_server(app, "127.0.0.1", 0)
    url = server.url
    try:
        # rank 4 generations: a click and keys, the last rank fills itself in; Enter saves
        browser.get(url)
        assert browser.find_element(By.TAG_NAME, "h1").text == "给评论排序"
        texts = texts_on(browser)
        assert len(texts) == 4 and len(set(texts)) == 4
        shot(browser, "1_labeling_zh")
        browser.find_elements(By.CSS_SELECTOR, ".item .text")[2].click()  # text 3 is the best
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("1")  # then text 1
        body.send_keys("4")  # then text 4; text 2 is left and becomes the worst
        assert badges(browser) == ["2", "4", "1", "3"]
        body.send_keys("\ue003")  # Backspace takes the last rank back ...
        assert badges(browser) == ["2", "–", "1", "3"]
        body.send_keys("2")       # ... and text 2 gets it again
        assert badges(browser) == ["2", "4", "1", "3"]
        assert [Select(s).first_selected_option.text for s in browser.find_elements(By.TAG_NAME, "select")] \
            == ["2", "4", "1", "3"]
        shot(browser, "2_labeling_ranked")
        before = out.read_bytes()
        navigates(browser, lambda: body.send_keys("\ue007"))  # Enter
        line = "\t".join([texts[2], texts[0], texts[3], texts[1]]) + "\n"
        assert out.read_bytes() == before + line.encode("utf-8")  # exactly that line, appended
        assert "你保存了 1 条" in browser.find_element(By.ID, "progress").text

        # duplicate ranks through the selects: the message, and nothing written
        for i, rank in enumerate(["1", "2", "2", "4"]):
            Select(browser.find_element(By.NAME, f"rank_{i}")).select_by_value(rank)
        saved = out.read_bytes()
        navigates(browser, browser.find_element(By.ID, "save").click)
        assert browser.find_element(By.TAG_NAME, "h1").text == "未保存"
        assert "名次 2 给了不止一条文本" in browser.find_element(By.CLASS_NAME, "error").text
        shot(browser, "3_duplicate_ranks_refused")
        assert out.read_bytes() == saved

        # a typed prompt, and the English page
        browser.get(url)
        browser.find_element(By.ID, "prompt").send_keys("物流很快，")
        navigates(browser, browser.find_element(By.ID, "use_prompt").click)
        assert all(t.startswith("物流很快，") for t in texts_on(browser)) and len(texts_on(browser)) == 4
        browser.get(url + "?lang=en")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Rank the reviews"
        shot(browser, "4_labeling_en")

        # the dataset view: counts, the saved line, and remove
        browser.get(url + "dataset")
        assert "中共有 2 条排序列表，其中你保存了 1 条" in browser.find_element(By.ID, "summary").text
        shot(browser, "5_dataset_zh")
        row = browser.find_element(By.ID, "line_2")
        assert [li.text for li in row.find_elements(By.TAG_NAME, "li")] == [texts[2], texts[0], texts[3], texts[1]]
        navigates(browser, row.find_element(By.CLASS_NAME, "remove").click)
        assert "已删除第 2 行" in browser.find_element(By.ID, "notice").text
        shot(browser, "6_dataset_removed")
        assert out.read_bytes() == before  # the line is gone from the file ...
        stamp, kept = removed_path(out).read_text(encoding="utf-8").rstrip("\n").split("\t", 1)
        assert kept + "\n" == line and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)  # ... and kept here
        assert [line.number for line in read_lines(out)] == [1]
    finally:
        server.shutdown()
        server.server_close()

    # the rating page: the texts of a pending Score, rated with stars, come back as its result
    from haoping.client import ScorerClient

    with ScorerClient(scorer.address, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.score, ["质量很好，物流也快", "太差了，不推荐"])
        wait_for(lambda: json.loads(urllib.request.urlopen(rating_url + "pending.json", timeout=5).read()),
                 "the Score request reached the rating page")
        browser.get(rating_url)
        assert browser.find_element(By.TAG_NAME, "h1").text == "给评论打分"
        assert texts_on(browser) == ["质量很好，物流也快", "太差了，不推荐"]
        browser.find_element(By.CSS_SELECTOR, 'input[name="stars_0"][value="5"]').click()
        browser.find_element(By.CSS_SELECTOR, 'input[name="stars_1"][value="2"]').click()
        shot(browser, "7_rating_zh")
        navigates(browser, browser.find_element(By.ID, "submit").click)
        reply = pending.result(timeout=30)
        assert [s.score for s in reply.scores] == [1.0, 0.25] and [s.raw_score for s in reply.scores] == [5.0, 2.0]
        assert browser.find_element(By.ID, "empty").text.startswith("现在没有要打分的文本")
        browser.get(rating_url + "?lang=en")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Rate the reviews"
        shot(browser, "8_rating_en_empty")


def wait_for(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not seen within {timeout:.0f}s: {what}"
        time.sleep(0.05)
