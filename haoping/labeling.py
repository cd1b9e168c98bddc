"""The rank-list labeling page: a person ranks a prompt's K generations, best first, and each
ranking is appended to a rank-list file (the format of :mod:`haoping.ranklists`, which
``haoping train-reward-model --train`` reads).

Also the small web plumbing the human-reward page (:mod:`haoping.scorers.human`) shares:
plain HTML forms over the standard library's ``ThreadingHTTPServer``, no JavaScript.
An app is two methods, ``get(path)`` and ``post(path, form)``, returning a :class:`Response`
or raising :class:`BadRequest` (HTTP 400, nothing changed), so it is testable without sockets.
"""
from __future__ import annotations

import html
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from haoping.log import get_logger
from haoping.ranklists import RankListError, append_ranklist, one_line, parse_ranklists

log = get_logger(__name__)

MAX_FORM_BYTES = 64 * 1024


# --- web plumbing -------------------------------------------------------------------------

class BadRequest(ValueError):
    """A submission the page refuses with HTTP 400; the message is shown to the person."""


@dataclass
class Response:
    body: str = ""
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    location: str = ""  # set: a 303 redirect (post/redirect/get, so a reload does not resubmit)


def redirect(location: str) -> Response:
    return Response(status=303, location=location)


def page(title: str, body: str, refresh_seconds: int = 0) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds else ""
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8">{refresh}<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em; }}
.text {{ font-size: 1.2em; margin: .3em 0 .8em; }}
.item {{ border-bottom: 1px solid #ddd; padding: .6em 0; }}
.error {{ color: #a00; }} .meta {{ color: #666; }}
button {{ font-size: 1em; margin-right: 1em; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def error_page(message: str, back: str = "/") -> str:
    return page("Not saved", f'<p class="error">{html.escape(message)}</p>'
                             f'<p>Nothing was saved. <a href="{html.escape(back)}">Back</a></p>')


def parse_form(body: bytes) -> dict[str, str]:
    """An urlencoded form as {name: value}; a field given twice or bytes that are not UTF-8 are a BadRequest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the form is not UTF-8") from None
    form: dict[str, str] = {}
    for name, values in parse_qs(text, keep_blank_values=True, max_num_fields=1000).items():
        if len(values) > 1:
            raise BadRequest(f"field {name!r} given {len(values)} times")
        form[name] = values[0]
    return form


class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"

    def do_GET(self):
        self._answer(lambda: self.server.app.get(urlsplit(self.path).path))

    def do_POST(self):
        def post() -> Response:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_FORM_BYTES:
                raise BadRequest(f"form larger than {MAX_FORM_BYTES} bytes")
            return self.server.app.post(urlsplit(self.path).path, parse_form(self.rfile.read(length)))
        self._answer(post)

    def _answer(self, handle: Callable[[], Response]) -> None:
        try:
            response = handle()
        except BadRequest as err:
            response = Response(error_page(str(err)), status=400)
        except Exception as err:  # noqa: BLE001 - the person sees it; the server keeps serving
            log.exception("%s %s failed", self.command, self.path)
            response = Response(error_page(f"server error: {err}"), status=500)
        body = response.body.encode("utf-8")
        self.send_response(response.status)
        if response.location:
            self.send_header("Location", response.location)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app, host: str, port: int):
        self.app = app
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def start_web_server(app, host: str = "127.0.0.1", port: int = 0) -> WebServer:
    """Serve ``app`` in a daemon thread (port 0 picks a free one); ``.url`` says where, ``.shutdown()`` stops it."""
    try:
        server = WebServer(app, host, port)
    except OSError as err:
        raise SystemExit(f"cannot serve a page on {host}:{port}: {err.strerror or err}") from None
    threading.Thread(target=server.serve_forever, args=(0.1,), name="web-page", daemon=True).start()
    return server


# --- ranking ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    id: str
    prompt: str
    texts: tuple[str, ...]


def ranking_from_form(form: dict[str, str], count: int) -> list[int]:
    """Text indices best first, from fields ``rank_0`` .. ``rank_<count-1>`` holding distinct ranks 1..count.

    Raises :class:`BadRequest` for a missing, extra, non-numeric, out-of-range or repeated rank."""
    given = sorted(name for name in form if name.startswith("rank_"))
    expected = [f"rank_{i}" for i in range(count)]
    if given != sorted(expected):
        raise BadRequest(f"expected ranks for {count} texts (rank_0 .. rank_{count - 1}), got {len(given)} "
                         f"rank field(s): {', '.join(given) or 'none'}")
    ranks = []
    for i, name in enumerate(expected):
        raw = form[name].strip()
        if not raw:
            raise BadRequest(f"text {i + 1} has no rank; give every text a rank from 1 to {count}")
        if not raw.isdecimal() or not 1 <= int(raw) <= count:
            raise BadRequest(f"text {i + 1}: rank {raw!r} is not a whole number from 1 to {count}")
        ranks.append(int(raw))
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise BadRequest(f"rank(s) {', '.join(map(str, repeated))} given to more than one text; "
                         "every text needs its own rank")
    return sorted(range(count), key=lambda i: ranks[i])


def draw_group(draw: Callable[[str, int, int], list[str]], prompt: str, k: int, seed: int,
               attempts: int = 4) -> list[str]:
    """Up to ``k`` distinct one-line texts for ``prompt`` (a rank list cannot hold a text twice):
    draws again with the next seed while samples repeat, at most ``attempts`` times."""
    texts: list[str] = []
    for attempt in range(attempts):
        for text in draw(prompt, k, seed + attempt):
            text = one_line(text)  # shown exactly as the file will hold it
            if text and text not in texts:
                texts.append(text)
        if len(texts) >= k:
            break
    if len(texts) < 2:
        raise RuntimeError(f"the policy gave fewer than 2 distinct texts for {prompt!r} in {attempts} draws")
    return texts[:k]


def count_saved(path: Path) -> int:
    """Rank lists already in the output file (bad lines not counted)."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        return len(parse_ranklists(path.read_bytes(), str(path))[0])
    except RankListError:
        return 0


@dataclass
class RankingApp:
    """The labeling page. GET / shows the current group; POST /rank saves its ranking (or skips it).

    ``draw(prompt, n, seed)`` returns ``n`` sampled texts (prompt included). One group is open at a
    time; a ranking for any other group id is refused, so a resubmitted form never saves twice."""
    draw: Callable[[str, int, int], list[str]]
    prompts: list[str]
    out: Path
    k: int = 4
    seed: int = 0
    saved_before: int = 0   # lists in the file when the page started
    saved: int = 0          # lists this page appended
    skipped: int = 0
    current: Group | None = None
    _drawn: int = 0
    _closed: deque = field(default_factory=lambda: deque(maxlen=256))  # ids already saved or skipped
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be at least 2 to rank, got {self.k}")
        if not self.prompts:
            raise ValueError("no prompts")
        self.out = Path(self.out)
        self.saved_before = count_saved(self.out)

    def _current(self) -> Group:
        if self.current is None:
            prompt = self.prompts[self._drawn % len(self.prompts)]
            # seeds far apart, so the redraws of one group never reuse another group's seed
            texts = draw_group(self.draw, prompt, self.k, self.seed + 1000 * self._drawn)
            self._drawn += 1
            self.current = Group(secrets.token_hex(8), prompt, tuple(texts))
        return self.current

    def get(self, path: str) -> Response:
        if path != "/":
            return Response(error_page(f"no page {path}"), status=404)
        with self._lock:
            return Response(self.render(self._current()))

    def post(self, path: str, form: dict[str, str]) -> Response:
        if path != "/rank":
            return Response(error_page(f"no form at {path}"), status=404)
        with self._lock:
            group = self._open_group(form.get("group", ""))
            action = form.get("action", "save")
            if action not in ("save", "skip"):
                raise BadRequest(f"unknown action {action!r}; use save or skip")
            if action == "skip":
                self.skipped += 1
            else:
                order = ranking_from_form(form, len(group.texts))
                try:
                    append_ranklist(self.out, [group.texts[i] for i in order])
                except RankListError as err:  # the texts were made one-line and distinct when drawn
                    raise BadRequest(str(err)) from None
                self.saved += 1
                log.info("saved rank list %d to %s", self.saved_before + self.saved, self.out)
            self._closed.append(group.id)
            self.current = None
        return redirect("/")

    def _open_group(self, group_id: str) -> Group:
        if self.current is not None and group_id == self.current.id:
            return self.current
        if group_id in self._closed:
            raise BadRequest("this group was already saved or skipped (a resubmitted form?)")
        raise BadRequest(f"unknown group {group_id!r}; reload the page to get the current one")

    def render(self, group: Group) -> str:
        n = len(group.texts)
        options = '<option value="">–</option>' + "".join(f'<option value="{r}">{r}</option>'
                                                          for r in range(1, n + 1))
        items = "".join(
            f'<div class="item"><div class="text">{html.escape(text)}</div>'
            f'<label>rank <select name="rank_{i}">{options}</select></label></div>'
            for i, text in enumerate(group.texts))
        body = (f'<p class="meta">Prompt: {html.escape(group.prompt)}</p>'
                f"<p>Give each text its own rank: 1 = best, {n} = worst.</p>"
                f'<form method="post" action="/rank" accept-charset="utf-8">'
                f'<input type="hidden" name="group" value="{group.id}">{items}<p>'
                f'<button type="submit" name="action" value="save">Save ranking</button>'
                f'<button type="submit" name="action" value="skip">Skip</button></p></form>'
                f'<p class="meta">Saved this session: {self.saved}, skipped: {self.skipped}; '
                f"rank lists in {html.escape(str(self.out))}: {self.saved_before + self.saved}</p>")
        return page("Rank the reviews", body)


# --- where the texts come from ------------------------------------------------------------

def generator_service_draw(address: str, max_new_tokens: int, min_new_tokens: int,
                           timeout: float = 60.0) -> Callable[[str, int, int], list[str]]:
    """Samples from a running Generator service."""
    from haoping.client import GeneratorClient

    client = GeneratorClient(address, timeout=timeout)

    def draw(prompt: str, n: int, seed: int) -> list[str]:
        reply = client.generate([prompt], n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0,
                                top_p=1.0, seed=seed, min_new_tokens=min_new_tokens)
        return [s.full_text for s in reply.samples]
    return draw


def in_process_draw(policy_ref: str, max_new_tokens: int, min_new_tokens: int,
                    device: str = "cpu") -> Callable[[str, int, int], list[str]]:
    """Samples from a policy loaded into this process, seeded as the Generator service seeds them."""
    from haoping.generation import PolicyGenerator, SampleSpec, SamplingParams, sample_seed

    generator = PolicyGenerator(policy_ref, device)
    params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)

    def draw(prompt: str, n: int, seed: int) -> list[str]:
        ids = tuple(generator.encode(prompt))
        samples, _ = generator.generate([SampleSpec(ids, params, sample_seed(seed, 0, i)) for i in range(n)])
        return [generator.decode(s.prompt_ids) + generator.decode(s.response_ids) for s in samples]
    return draw
