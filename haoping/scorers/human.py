"""Human reward: a person scores the texts of each Score request on a web page.

:class:`HumanScorer` is the ``human`` scorer backend. Its :meth:`~HumanScorer.score` puts the
texts in a queue of pending batches and blocks until :meth:`~HumanScorer.submit` brings a
rating for every text, the timeout passes, or the caller is cancelled (the batch then leaves
the queue). :class:`HumanScorePage` is the page that shows the oldest pending batch and
submits the ratings.

Ratings are 1-5 stars; the reward is ``(stars - 1) / 4``, so 0, 0.25, 0.5, 0.75 or 1, on the
same [0, 1] scale as the classifier's positive probability; ``raw_score`` keeps the stars.
"""
from __future__ import annotations

import html
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import urllib.request

from haoping.webpage import (BadRequest, Request, Response, Strings, WebServer, choices_from_form, error_page, link,
                             page, redirect, start_web_server)
from haoping.log import get_logger
from haoping.scorers.base import ScoreCancelled, ScorerBusy, ScoreResult, ScoreTimeout

log = get_logger(__name__)

MAX_STARS = 5
POLL_SECONDS = 0.1  # how often a waiting score() looks at its caller's cancellation and deadline


def stars_to_score(stars: int) -> float:
    return (stars - 1) / (MAX_STARS - 1)


class TooManyPending(ScorerBusy):
    """``max_pending`` batches are already waiting for a person."""


class UnknownBatch(KeyError):
    """No pending batch has this id: already rated, timed out or cancelled."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class PendingBatch:
    id: str
    texts: tuple[str, ...]
    created: float = field(default_factory=time.monotonic)
    stars: list[int] | None = None  # set by submit()


class HumanScorer:
    """Thread-safe queue of texts waiting for a person's ratings; the ``human`` scorer backend."""

    backend = "human"
    model_id = "human"
    max_length = 0
    batchable = False  # each request is its own batch on the page, waiting as long as its deadline
    scores_in_unit_interval = True  # stars mapped to [0, 1]

    def __init__(self, max_pending: int = 256, host: str = "127.0.0.1", port: int = 8090):
        self.max_pending = max_pending
        self.host, self.port = host, port
        self.page: WebServer | None = None  # the rating page, while started
        self._pending: dict[str, PendingBatch] = {}  # insertion order: oldest first
        self._cond = threading.Condition()

    def start(self) -> None:
        if self.page is None:
            self.page = start_web_server(HumanScorePage(self), self.host, self.port)
            log.info("human scores: rate texts at %s", self.page.url)

    def stop(self) -> None:
        if self.page is not None:
            self.page.shutdown()
            self.page.server_close()
            self.page = None

    def warm_up(self) -> None:
        """A Score would wait for a person; the page answering is what serving means here."""
        self.start()
        with urllib.request.urlopen(self.page.url, timeout=10) as reply:
            if reply.status != 200:
                raise RuntimeError(f"rating page {self.page.url} answered HTTP {reply.status}")

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        """Block until a person rated every text. Raises :class:`ScoreTimeout` after ``timeout``
        seconds (None: no limit), :class:`ScoreCancelled` once ``is_cancelled()`` is true,
        :class:`TooManyPending` when the queue is full; the texts leave the page in all three cases."""
        if not texts:
            raise ValueError("no texts to score")
        deadline = None if timeout is None else time.monotonic() + timeout
        batch = PendingBatch(secrets.token_hex(8), tuple(texts))
        with self._cond:
            if len(self._pending) >= self.max_pending:
                raise TooManyPending(f"{len(self._pending)} batches already wait for a person")
            self._pending[batch.id] = batch
            log.info("%d text(s) wait for a person's rating (batch %s, %d batch(es) pending)",
                     len(texts), batch.id, len(self._pending))
            try:
                while batch.stars is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise ScoreTimeout(f"no rating for {len(texts)} text(s) within {timeout:.1f}s")
                    if is_cancelled():
                        raise ScoreCancelled("the caller cancelled before the texts were rated")
                    self._cond.wait(POLL_SECONDS if remaining is None else min(POLL_SECONDS, remaining))
            finally:
                self._pending.pop(batch.id, None)
                self._cond.notify_all()
        return [ScoreResult(stars_to_score(s), "human", float(s)) for s in batch.stars]

    def pending(self) -> list[PendingBatch]:
        """The batches waiting for ratings, oldest first (copies)."""
        with self._cond:
            return [PendingBatch(b.id, b.texts, b.created) for b in self._pending.values()]

    def submit(self, batch_id: str, stars: Sequence[int]) -> None:
        """Rate a pending batch: one whole number of stars (1-5) per text, in the batch's order.
        Raises :class:`UnknownBatch` or ValueError (nothing changes then)."""
        with self._cond:
            batch = self._pending.get(batch_id)
            if batch is None:
                raise UnknownBatch(f"no pending batch {batch_id!r}: already rated, timed out or cancelled")
            if len(stars) != len(batch.texts):
                raise ValueError(f"batch {batch_id} has {len(batch.texts)} texts, got {len(stars)} ratings")
            for i, s in enumerate(stars):
                if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_STARS:
                    raise ValueError(f"text {i + 1}: {s!r} is not a whole number of stars from 1 to {MAX_STARS}")
            batch.stars = list(stars)
            del self._pending[batch_id]  # off the page at once, before the caller wakes
            self._cond.notify_all()


STRINGS = Strings({
    "title": ("给评论打分", "Rate the reviews"),
    "nothing_to_rate": ("现在没有要打分的文本；这个页面会自动刷新。", "Nothing to rate right now; this page reloads itself."),
    "how_to": ("每条评论有多好？1 星 = 差，{max_stars} 星 = 非常好的好评。训练在等你的评分。",
               "How good is each review? 1 star = bad, {max_stars} stars = an excellent positive review. "
               "Training waits for your ratings."),
    "stars_title": ("{stars} 星", "{stars} star(s)"),
    "submit": ("提交评分", "Submit ratings"),
    "queue": ("{texts} 条文本，已等待 {waiting} 秒；队列中共有 {batches} 批",
              "{texts} text(s), waiting {waiting}s; {batches} batch(es) in the queue"),
    # form errors (HTTP 400, nothing saved)
    "stars_fields": ("这一批有 {count} 条文本（stars_0 到 stars_{last}），收到的评分字段：{fields}",
                     "this batch has {count} texts (stars_0 .. stars_{last}); got rating field(s): {fields}"),
    "stars_missing": ("第 {text} 条还没有评分；每条都要打 1 到 {highest} 星",
                      "text {text} has no rating; rate every text from 1 to {highest} stars"),
    "stars_bad": ("第 {text} 条：{value} 不是 1 到 {highest} 的整数星数",
                  "text {text}: {value!r} is not a whole number of stars from 1 to {highest}"),
    "batch_gone": ("没有待评分的这一批（{batch}）：已经评过、超时或被取消了",
                   "no pending batch {batch!r}: already rated, timed out or cancelled"),
})


def stars_from_form(form: dict[str, str], count: int) -> list[int]:
    """Ratings from fields ``stars_0`` .. ``stars_<count-1>``; :class:`BadRequest` if any is missing, extra or bad."""
    try:
        return choices_from_form(form, "stars", count, MAX_STARS, distinct=False)
    except BadRequest as err:
        err.params.setdefault("last", count - 1)
        raise


@dataclass
class HumanScorePage:
    """GET / shows the oldest pending batch, POST /score rates it, GET /pending.json lists the queue."""
    scorer: HumanScorer
    refresh_seconds: int = 3  # an empty queue reloads itself; a page with a form never does (input would be lost)
    strings: Strings = STRINGS

    def get(self, request: Request) -> Response:
        t, lang = self.strings, request.lang
        pending = self.scorer.pending()
        if request.path == "/pending.json":
            now = time.monotonic()
            queue = [{"id": b.id, "texts": list(b.texts), "waiting_seconds": round(now - b.created, 1)}
                     for b in pending]
            return Response(json.dumps(queue, ensure_ascii=False), content_type="application/json")
        if request.path != "/":
            return Response(error_page(request, t, t(lang, "no_page", path=request.path)), status=404)
        if not pending:
            return Response(page(request, t, t(lang, "title"), f'<p id="empty">{t(lang, "nothing_to_rate")}</p>',
                                 self.refresh_seconds))
        return Response(self.render(request, pending[0], len(pending)))

    def post(self, request: Request) -> Response:
        t, lang = self.strings, request.lang
        if request.path != "/score":
            return Response(error_page(request, t, t(lang, "no_form", path=request.path)), status=404)
        batch_id = request.form.get("batch", "")
        batch = next((b for b in self.scorer.pending() if b.id == batch_id), None)
        if batch is None:
            raise BadRequest("batch_gone", batch=batch_id[:32])
        try:
            self.scorer.submit(batch_id, stars_from_form(request.form, len(batch.texts)))
        except UnknownBatch:  # e.g. the caller timed out meanwhile
            raise BadRequest("batch_gone", batch=batch_id[:32]) from None
        return redirect(link("/", lang))

    def render(self, request: Request, batch: PendingBatch, batches_waiting: int) -> str:
        t, lang = self.strings, request.lang

        def stars_input(i: int) -> str:
            return " ".join(f'<label title="{html.escape(t(lang, "stars_title", stars=s))}">'
                            f'<input type="radio" name="stars_{i}" value="{s}">{"★" * s}</label>'
                            for s in range(1, MAX_STARS + 1))
        items = "".join(f'<div class="item"><div class="text">{html.escape(text)}</div>{stars_input(i)}</div>'
                        for i, text in enumerate(batch.texts))
        waiting = math.floor(time.monotonic() - batch.created)
        body = (f"<p>{html.escape(t(lang, 'how_to', max_stars=MAX_STARS))}</p>"
                f'<form method="post" action="{html.escape(link("/score", lang))}" accept-charset="utf-8">'
                f'<input type="hidden" name="batch" value="{batch.id}">{items}'
                f'<p><button type="submit" id="submit">{t(lang, "submit")}</button></p></form>'
                f'<p class="meta">{html.escape(t(lang, "queue", texts=len(batch.texts), waiting=waiting, batches=batches_waiting))}</p>')
        return page(request, t, t(lang, "title"), body)
