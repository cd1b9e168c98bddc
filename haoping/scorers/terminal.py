"""Human reward in the terminal: each text is printed, the person types 1-5 stars for it.

:class:`TerminalScorer` is a :class:`~haoping.scorers.base.Scorer` that reads the terminal of
the process it runs in (``haoping run --scorer-backend human --human-ui terminal`` uses it in
place of a scorer service). The stars map to rewards as on the rating page
(:func:`haoping.scorers.human.stars_to_score`: 1 -> 0.0 ... 5 -> 1.0), so both ways of giving
human reward mean the same. A bad entry is explained and asked again; ``q`` or end of input
(Ctrl-D) raises :class:`HumanStopped`; Ctrl-C raises KeyboardInterrupt as usual. The deadline
and the caller's cancellation are honoured while it waits for a line.

:class:`LocalScorerClient` puts any Scorer behind the ``score(texts) -> ScoreResponse`` call
of :class:`haoping.client.ScorerClient`, so the coordinator uses either without knowing which.
"""
from __future__ import annotations

import os
import select
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import TextIO

from haoping.scorers.base import ScoreCancelled, Scorer, ScoreResult, ScoreTimeout
from haoping.scorers.human import MAX_STARS, stars_to_score

POLL_SECONDS = 0.1  # how often a waiting read looks at the deadline and the caller's cancellation
QUIT_WORDS = ("q", "quit", "exit", "退出")


class HumanStopped(ScoreCancelled):
    """The person ended the input (``q`` or end of file): stop, keeping what is done."""


def parse_stars(entry: str) -> int | None:
    """Whole stars 1..MAX_STARS from what the person typed (full-width digits too), else None."""
    entry = unicodedata.normalize("NFKC", entry).strip()
    if entry.isascii() and entry.isdecimal() and 1 <= int(entry) <= MAX_STARS:
        return int(entry)
    return None


class TerminalScorer:
    backend = "human"
    model_id = "human-terminal"
    max_length = 0
    batchable = False  # one person, one text at a time
    scores_in_unit_interval = True  # stars mapped to [0, 1]

    def __init__(self, input_fd: int | None = None, output: TextIO | None = None):
        self.input_fd = sys.stdin.fileno() if input_fd is None else input_fd
        self.output = output or sys.stdout
        self.batches = 0
        self._buffer = b""  # bytes read past the last line handed out
        self._started = False

    def _say(self, text: str, end: str = "\n") -> None:
        self.output.write(text + end)
        self.output.flush()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._say(f"人工奖励：每条文本给 1 到 {MAX_STARS} 星（1 = 差，{MAX_STARS} = 非常好的好评），"
                      f"回车确认；q 或 Ctrl-D 结束。\n"
                      f"Human reward: give each text 1 to {MAX_STARS} stars (1 = bad, {MAX_STARS} = an "
                      f"excellent positive review), then Enter; q or Ctrl-D stops.")

    def stop(self) -> None:
        pass

    def warm_up(self) -> None:
        """Nothing to load; the terminal is there or the first read says so."""

    def score(self, texts: Sequence[str], timeout: float | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> list[ScoreResult]:
        if not texts:
            raise ValueError("no texts to score")
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        self.batches += 1
        self._say(f"\n=== 第 {self.batches} 批：{len(texts)} 条 / batch {self.batches}: {len(texts)} text(s) ===")
        try:
            return self._ask(texts, deadline, is_cancelled, timeout)
        except KeyboardInterrupt:
            self._say("")  # Ctrl-C: leave the prompt line before the caller reports it
            raise

    def _ask(self, texts: Sequence[str], deadline: float | None, is_cancelled: Callable[[], bool],
             timeout: float | None) -> list[ScoreResult]:
        results = []
        for i, text in enumerate(texts):
            self._say(f"\n[{i + 1}/{len(texts)}] {text}")
            while True:
                self._say(f"奖励 reward (1-{MAX_STARS}, q 结束/quit): ", end="")
                line = self._read_line(deadline, is_cancelled, timeout)
                if line is None:
                    self._say("")
                    raise HumanStopped("the input ended (Ctrl-D)")
                if line.strip().lower() in QUIT_WORDS:
                    raise HumanStopped("the person typed q")
                stars = parse_stars(line)
                if stars is not None:
                    break
                self._say(f"  {line.strip()!r}：请输入 1 到 {MAX_STARS} 的整数 / "
                          f"type a whole number from 1 to {MAX_STARS}")
            results.append(ScoreResult(stars_to_score(stars), "human", float(stars)))
        return results

    def _read_line(self, deadline: float | None, is_cancelled: Callable[[], bool],
                   timeout: float | None) -> str | None:
        """The next line typed (without its newline), or None at end of input."""
        while b"\n" not in self._buffer:
            if is_cancelled():
                raise ScoreCancelled("the caller cancelled before the texts were rated")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ScoreTimeout(f"no rating within {timeout:.1f}s")
            wait = POLL_SECONDS if remaining is None else min(POLL_SECONDS, remaining)
            readable, _, _ = select.select([self.input_fd], [], [], wait)
            if not readable:
                continue
            try:
                chunk = os.read(self.input_fd, 4096)
            except OSError:  # a pseudo-terminal whose other side closed
                chunk = b""
            if not chunk:
                if self._buffer:  # a last line without its newline still counts
                    line, self._buffer = self._buffer, b""
                    return line.decode("utf-8", "replace")
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")


class LocalScorerClient:
    """A Scorer in this process with :class:`haoping.client.ScorerClient`'s ``score`` call;
    ``timeout`` (seconds, None: none) is each call's deadline, as the client's is."""

    def __init__(self, scorer: Scorer, timeout: float | None = None):
        self.scorer, self.timeout = scorer, timeout

    def __enter__(self) -> "LocalScorerClient":
        self.scorer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.scorer.stop()

    def score(self, texts: list[str]):
        from haoping.v1 import haoping_pb2 as pb

        results = self.scorer.score(list(texts), timeout=self.timeout)
        return pb.ScoreResponse(scores=[pb.TextScore(score=r.score, label=r.label, raw_score=r.raw_score)
                                        for r in results],
                                model_id=self.scorer.model_id, backend=self.scorer.backend)
