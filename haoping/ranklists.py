"""Human rank lists: reading and writing the TSV format, and starter lists from the corpus.

Format: one rank list per line, UTF-8, its texts separated by tabs, best first, at least 2
texts. A bad line (fewer than 2 texts, an empty field, the same text twice, bytes that are
not UTF-8) is reported with its 1-based line number and skipped, or, with ``strict=True``,
rejected: :class:`RankListError` lists every bad line.

Several writers may share one file (two people labeling at once): every append and every
rewrite holds an exclusive ``fcntl.flock`` on ``<file>.lock`` (a lock file beside it, since a
rewrite replaces the file itself), and readers that must not see half a line hold it shared.
Removing a line never loses it: it is appended with a timestamp to ``<file>.removed`` and
fsynced before the file is rewritten atomically without it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from haoping.atomic import atomic_write_bytes
from haoping.corpus import Review


@dataclass(frozen=True)
class RankList:
    texts: tuple[str, ...]  # best first
    line: int = 0           # 1-based line in the source file; 0 when built in memory


@dataclass(frozen=True)
class LineProblem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class RankListError(ValueError):
    """Rank-list input that cannot be used; ``problems`` holds the bad lines, if any."""

    def __init__(self, message: str, problems: Sequence[LineProblem] = ()):
        super().__init__(message)
        self.problems = list(problems)


def _parse_line(raw: bytes, line_no: int) -> RankList | LineProblem:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return LineProblem(line_no, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})")
    line = line.rstrip("\r")  # files written on Windows
    if line.startswith("\ufeff"):
        line = line[1:]  # a byte-order mark some editors put before line 1
    if not line.strip():
        return LineProblem(line_no, "empty line")
    fields = [field.strip() for field in line.split("\t")]
    if len(fields) < 2:
        return LineProblem(line_no, "only 1 text; a rank list needs at least 2, separated by tabs")
    empty = [str(i + 1) for i, field in enumerate(fields) if not field]
    if empty:
        return LineProblem(line_no, f"empty text in field {', '.join(empty)} of {len(fields)}")
    first_seen: dict[str, int] = {}
    for i, field in enumerate(fields):
        if field in first_seen:
            # The same text above and below itself is a contradiction, not a ranking.
            return LineProblem(line_no, f"fields {first_seen[field] + 1} and {i + 1} hold the same text")
        first_seen[field] = i
    return RankList(tuple(fields), line_no)


def parse_ranklists(data: bytes, source: str = "<bytes>", strict: bool = False) -> tuple[list[RankList], list[LineProblem]]:
    """Parse the bytes of a rank-list file. See :func:`read_ranklists`."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RankListError(f"{source} is UTF-16; save it as UTF-8")
    lists: list[RankList] = []
    problems: list[LineProblem] = []
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line does not start another
    for line_no, raw in enumerate(raw_lines, start=1):
        parsed = _parse_line(raw, line_no)
        (problems if isinstance(parsed, LineProblem) else lists).append(parsed)
    if strict and problems:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RankListError(f"{source}: {len(problems)} bad line(s):\n  {shown}{more}", problems)
    if not lists:
        detail = f" ({len(problems)} bad line(s), first: {problems[0]})" if problems else ""
        raise RankListError(f"{source} holds no usable rank lists{detail}", problems)
    return lists, problems


def read_ranklists(path: str | Path, strict: bool = False) -> tuple[list[RankList], list[LineProblem]]:
    """(rank lists, problems) from a TSV file.

    Bad lines land in ``problems`` (line number and reason) and are left out of ``lists``;
    with ``strict=True`` any bad line raises :class:`RankListError` instead. A missing or
    unreadable file, a UTF-16 file, or a file without a single good line also raises it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RankListError(f"rank-list file not found: {path}") from None
    except OSError as err:
        raise RankListError(f"cannot read rank-list file {path}: {err.strerror or err}") from None
    return parse_ranklists(data, str(path), strict=strict)


def one_line(text: str) -> str:
    """``text`` as a rank-list field: tabs, newlines and runs of whitespace become one space."""
    # the reader drops a byte-order mark, so one kept here would not read back as written
    return re.sub(r"\s+", " ", text.replace("\ufeff", "")).strip()


def format_ranklist(texts: Sequence[str]) -> str:
    """One rank-list line (newline included) from texts best first, each put on one line.

    Raises :class:`RankListError` when the line would not parse back as the same list: fewer
    than 2 texts, or a text empty or repeated once tabs, newlines and runs of spaces are one space.
    """
    line = "\t".join(one_line(text) for text in texts)
    parsed = _parse_line(line.encode("utf-8"), 1)
    if isinstance(parsed, LineProblem):
        raise RankListError(f"not a valid rank list: {parsed.reason}", [parsed])
    return line + "\n"


def write_ranklists(path: str | Path, lists: Iterable[RankList | Sequence[str]]) -> int:
    """Write rank lists as TSV; returns how many were written."""
    lines = []
    for ranklist in lists:
        texts = ranklist.texts if isinstance(ranklist, RankList) else ranklist
        lines.append("\t".join(one_line(text) for text in texts) + "\n")
    Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def removed_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".removed")


@contextmanager
def ranklist_lock(path: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold ``<path>.lock``: exclusive to change ``path``, shared to read it whole."""
    with open(lock_path(path), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def append_ranklist(path: str | Path, texts: Sequence[str]) -> str:
    """Append one rank list (best first) to ``path`` and fsync it; returns the line written.

    Lists saved earlier survive a crash mid-write: the file is appended to, and only
    :func:`remove_line` rewrites it (atomically). A last line without its newline (e.g. edited
    by hand) gets one first, so the new list does not glue onto it. Holds the file's lock, so
    concurrent writers never interleave. Raises :class:`RankListError` before touching the file
    if ``texts`` is not a valid list (see :func:`format_ranklist`).
    """
    line = format_ranklist(texts)
    with ranklist_lock(path), open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, 2)
                if existing.read(1) != b"\n":
                    line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    return line.lstrip("\n")


def line_digest(raw: bytes) -> str:
    """A short fingerprint of one line's bytes (newline excluded): names the line a person
    asked to remove even when lines above it came or went meanwhile."""
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class FileLine:
    number: int               # 1-based
    raw: bytes                # without its newline
    parsed: RankList | LineProblem

    @property
    def digest(self) -> str:
        return line_digest(self.raw)


def _split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def read_lines(path: str | Path) -> list[FileLine]:
    """Every line of a rank-list file, parsed (a bad line keeps its :class:`LineProblem`);
    [] for a missing file. Holds the lock shared, so no half-written line is ever read."""
    with ranklist_lock(path, shared=True):
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return []
    return [FileLine(n, raw, _parse_line(raw, n)) for n, raw in enumerate(_split_lines(data), start=1)]


def remove_line(path: str | Path, number: int, digest: str) -> FileLine | None:
    """Move one line of ``path`` to ``<path>.removed``; returns it, or None when no line has
    ``digest`` (already removed, or never there). The line at ``number`` is taken if its digest
    matches, else the nearest line that has it (lines above it may have gone meanwhile).

    The removed line is appended as ``<UTC time>\t<line>`` to ``<path>.removed`` and fsynced
    first; then ``path`` is rewritten atomically without it. A crash in between leaves the line
    in both files, never in neither. The lock is held throughout."""
    path = Path(path)
    with ranklist_lock(path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        lines = _split_lines(data)
        matches = [i for i, raw in enumerate(lines) if line_digest(raw) == digest]
        if not matches:
            return None
        index = min(matches, key=lambda i: abs(i + 1 - number))
        removed = FileLine(index + 1, lines[index], _parse_line(lines[index], index + 1))
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        with open(removed_path(path), "ab") as log:
            log.write(stamp.encode() + b"\t" + removed.raw + b"\n")
            log.flush()
            os.fsync(log.fileno())
        kept = lines[:index] + lines[index + 1:]
        atomic_write_bytes(path, b"".join(raw + b"\n" for raw in kept))
    return removed


# --- Starter rank lists -------------------------------------------------------------------
#
# The corpus only says positive or negative, but real rank lists grade quality: very
# positive > mildly positive > negative > very negative. The starter lists teach a graded,
# additive notion of sentiment by composing reviews into five grades:
#
#   4  two positive reviews about different things   ("praises several aspects")
#   3  one positive review
#   2  a positive review with a complaint attached   ("good, but ...": mildly positive)
#   1  one negative review
#   0  two negative reviews                          ("complains about everything")
#
# Each list takes 2–4 distinct grades, best first, with fresh reviews for every text, so
# most lists mix positives and negatives with positives first, and the within-sentiment
# pairs (4 > 3, 1 > 0) teach that more praise is better and more complaints are worse.

GRADE_NAMES = {4: "two positives", 3: "positive", 2: "positive, but a complaint", 1: "negative", 0: "two negatives"}
_JOINERS = ("", "。", "，", "！", " ")
_CONTRASTS = ("，但是", "，不过", "，就是", "。但是", "。不过", "，可是", "。")
_MAX_PART_CHARS = 60  # composed texts stay within a 128-token window


def _join(first: str, second: str, joiners: Sequence[str], rng: random.Random) -> str:
    first = first.rstrip()
    joiner = rng.choice(joiners)
    if joiner and first and first[-1] in "。！!？?.~；;，," and joiner[0] in "。，！ ":
        joiner = joiner[1:]  # no doubled punctuation
    return first + joiner + second.lstrip()


def build_starter_ranklists(reviews: Sequence[Review], count: int, seed: int = 0,
                            min_length: int = 2, max_length: int = 4) -> list[RankList]:
    """``count`` rank lists of ``min_length``–``max_length`` graded texts composed from
    ``reviews`` (see the grade table above). Same reviews and seed, same lists."""
    rng = random.Random(seed)
    positives = sorted(r.text for r in reviews if r.label == 1)
    negatives = sorted(r.text for r in reviews if r.label == 0)
    short_pos = [t for t in positives if len(t) <= _MAX_PART_CHARS]
    short_neg = [t for t in negatives if len(t) <= _MAX_PART_CHARS]
    if min(len(short_pos), len(short_neg)) < 2 * max_length:
        raise ValueError(f"too few short reviews to build starter lists "
                         f"({len(short_pos)} positive, {len(short_neg)} negative)")
    if not 2 <= min_length <= max_length <= len(GRADE_NAMES):
        raise ValueError(f"list lengths must satisfy 2 <= min <= max <= {len(GRADE_NAMES)}")

    def text_of(grade: int) -> str:
        if grade == 4:
            first, second = rng.sample(short_pos, 2)
            return _join(first, second, _JOINERS, rng)
        if grade == 3:
            return rng.choice(positives)
        if grade == 2:
            return _join(rng.choice(short_pos), rng.choice(short_neg), _CONTRASTS, rng)
        if grade == 1:
            return rng.choice(negatives)
        first, second = rng.sample(short_neg, 2)
        return _join(first, second, _JOINERS, rng)

    lists = []
    while len(lists) < count:
        size = rng.randint(min_length, max_length)
        grades = sorted(rng.sample(sorted(GRADE_NAMES), size), reverse=True)
        texts = tuple(text_of(g) for g in grades)
        if len(set(texts)) == len(texts):  # a repeated text cannot be ranked against itself
            lists.append(RankList(texts))
    return lists
