"""The small web plumbing the labeling page (:mod:`haoping.labeling`) and the human rating page
(:mod:`haoping.scorers.human`) share: plain HTML forms over the standard library's
``ThreadingHTTPServer``, a little JavaScript where it helps, no template engine.

An app has ``strings`` (its translation table) and two methods, ``get(request)`` and
``post(request)``, returning a :class:`Response` or raising :class:`BadRequest` (HTTP 400,
nothing changed), so it is testable without sockets. Pages are Chinese unless the address
asks for ``?lang=en``; every string a page shows comes from its one :class:`Strings` table.
"""
from __future__ import annotations

import html
import string
import threading
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

from haoping.log import get_logger

log = get_logger(__name__)

MAX_FORM_BYTES = 64 * 1024
LANGUAGES = ("zh", "en")  # the first is the default
HTML_LANG = {"zh": "zh-CN", "en": "en"}
# Common CJK fonts of each desktop before the generic family: Windows and macOS ship one, a
# Linux desktop needs a package such as Debian's fonts-noto-cjk (see docs/labeling.md).
FONT_STACK = ('"Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB", '
              '"Microsoft YaHei", "WenQuanYi Micro Hei", "Droid Sans Fallback", sans-serif')


class BadRequest(ValueError):
    """A submission the page refuses with HTTP 400: ``key`` names the message in the page's
    :class:`Strings`, ``params`` fill it in, ``back`` is where the page's link goes. Nothing was changed."""

    def __init__(self, key: str, *, back: str = "/", **params):
        self.key, self.params, self.back = key, params, back
        super().__init__(f"{key}: {params}" if params else key)


class Strings:
    """One page's translation table: key -> (Chinese, English), ``str.format`` placeholders."""

    def __init__(self, table: dict[str, tuple[str, str]]):
        self.table = {**SHARED_STRINGS, **table}

    def __call__(self, lang: str, key: str, **params) -> str:
        zh, en = self.table[key]
        return (en if lang == "en" else zh).format(**params)

    def placeholders(self, key: str) -> tuple[set[str], set[str]]:
        """The names each language's text of ``key`` fills in (they must agree)."""
        return tuple({name for _, name, _, _ in string.Formatter().parse(text) if name}  # type: ignore[return-value]
                     for text in self.table[key])


SHARED_STRINGS: dict[str, tuple[str, str]] = {
    "not_saved": ("未保存", "Not saved"),
    "nothing_saved": ("什么都没有保存。", "Nothing was saved."),
    "back": ("返回", "Back"),
    "other_language": ("English", "中文"),
    "no_page": ("没有这个页面：{path}", "no page {path}"),
    "no_form": ("这里没有表单：{path}", "no form at {path}"),
    "server_error": ("服务器出错：{error}", "server error: {error}"),
    "form_not_utf8": ("表单不是 UTF-8 编码", "the form is not UTF-8"),
    "form_too_large": ("表单超过 {limit} 字节", "form larger than {limit} bytes"),
    "field_repeated": ("字段 {name} 出现了 {times} 次", "field {name!r} given {times} times"),
}


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str] = field(default_factory=dict)
    form: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def lang(self) -> str:
        lang = self.query.get("lang", "")
        return lang if lang in LANGUAGES else LANGUAGES[0]


@dataclass
class Response:
    body: str = ""
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    location: str = ""  # set: a 303 redirect (post/redirect/get, so a reload does not resubmit)
    cookies: list[str] = field(default_factory=list)  # Set-Cookie values


class App(Protocol):
    strings: Strings

    def get(self, request: Request) -> Response: ...

    def post(self, request: Request) -> Response: ...


def link(path: str, lang: str, **params) -> str:
    """``path`` with the page's language kept (Chinese needs no parameter) and ``params`` added."""
    query = {**({"lang": lang} if lang != LANGUAGES[0] else {}), **{k: v for k, v in params.items() if v != ""}}
    return path + ("?" + urlencode(query) if query else "")


def redirect(location: str) -> Response:
    return Response(status=303, location=location)


PAGE_STYLE = f"""
body {{ font-family: {FONT_STACK}; max-width: 52em; margin: 1.5em auto; padding: 0 1em; line-height: 1.5; }}
nav {{ display: flex; gap: 1.2em; align-items: baseline; border-bottom: 1px solid #ddd; padding-bottom: .4em; }}
nav .lang {{ margin-left: auto; }}
.text {{ font-size: 1.2em; margin: .3em 0 .5em; }}
.item {{ border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; margin: .6em 0; }}
.item.ranked {{ border-color: #2a7; background: #f2fbf6; }}
.item .badge {{ display: inline-block; min-width: 1.6em; text-align: center; border-radius: 1em;
               background: #eee; margin-right: .5em; }}
.item.ranked .badge {{ background: #2a7; color: #fff; }}
.error {{ color: #a00; }} .meta {{ color: #666; }} .notice {{ color: #275; }}
button {{ font-size: 1em; margin-right: .8em; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #eee; padding: .3em; text-align: left; vertical-align: top; }}
input[type=text] {{ font-size: 1em; width: 20em; }}
"""


def page(request: Request, strings: Strings, title: str, body: str, refresh_seconds: int = 0,
         nav: str = "", script: str = "", switch_path: str = "") -> str:
    """A whole page: ``title`` and ``body`` are already in the request's language; ``nav`` is
    extra links for the top bar; ``script`` runs at the end of the body; the language switch
    links to ``switch_path`` (default: this page)."""
    lang = request.lang
    other = "en" if lang == "zh" else "zh"
    switch_to = link(switch_path or request.path, other)
    switch = f'<a class="lang" href="{html.escape(switch_to)}">{strings(lang, "other_language")}</a>'
    refresh = f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds else ""
    script = f"<script>{script}</script>" if script else ""
    return f"""<!doctype html>
<html lang="{HTML_LANG[lang]}"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>
<body><nav>{nav}{switch}</nav><h1>{html.escape(title)}</h1>
{body}
{script}</body></html>
"""


def error_page(request: Request, strings: Strings, message: str, back: str = "/") -> str:
    lang = request.lang
    return page(request, strings, strings(lang, "not_saved"),
                f'<p class="error">{html.escape(message)}</p><p>{strings(lang, "nothing_saved")} '
                f'<a href="{html.escape(link(back, lang))}">{strings(lang, "back")}</a></p>', switch_path=back)


def parse_form(body: bytes) -> dict[str, str]:
    """An urlencoded form as {name: value}; a field given twice or bytes that are not UTF-8 are a BadRequest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("form_not_utf8") from None
    form: dict[str, str] = {}
    for name, values in parse_qs(text, keep_blank_values=True, max_num_fields=1000).items():
        if len(values) > 1:
            raise BadRequest("field_repeated", name=name, times=len(values))
        form[name] = values[0]
    return form


def choices_from_form(form: dict[str, str], prefix: str, count: int, highest: int, distinct: bool) -> list[int]:
    """Whole numbers 1..``highest`` from fields ``<prefix>_0`` .. ``<prefix>_<count-1>``, in order.

    The one reader of ranks and stars. Raises :class:`BadRequest` with keys ``<prefix>_fields``
    (a field missing or extra), ``<prefix>_missing`` (empty), ``<prefix>_bad`` (not a whole
    number in range) and, with ``distinct``, ``<prefix>_repeated``; params ``text`` (1-based),
    ``value``, ``highest``, ``count``, ``fields``, ``values``."""
    expected = [f"{prefix}_{i}" for i in range(count)]
    given = sorted(name for name in form if name.startswith(prefix + "_"))
    if given != sorted(expected):
        raise BadRequest(f"{prefix}_fields", count=count, highest=highest, fields=", ".join(given) or "-")
    values = []
    for i, name in enumerate(expected):
        raw = form[name].strip()
        if not raw:
            raise BadRequest(f"{prefix}_missing", text=i + 1, highest=highest)
        if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= highest:
            raise BadRequest(f"{prefix}_bad", text=i + 1, value=raw, highest=highest)
        values.append(int(raw))
    repeated = sorted({v for v in values if values.count(v) > 1})
    if distinct and repeated:
        raise BadRequest(f"{prefix}_repeated", values=", ".join(map(str, repeated)), highest=highest)
    return values


def _cookies(header: str | None) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(header or "")
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"

    def _request(self, form: dict[str, str] | None = None) -> Request:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=100).items()}
        return Request(url.path, query, form or {}, _cookies(self.headers.get("Cookie")))

    def do_GET(self):
        request = self._request()
        self._answer(request, lambda: self.server.app.get(request))

    def do_POST(self):
        request = self._request()

        def post() -> Response:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_FORM_BYTES:
                raise BadRequest("form_too_large", limit=MAX_FORM_BYTES)
            return self.server.app.post(Request(request.path, request.query, parse_form(self.rfile.read(length)),
                                                request.cookies))
        self._answer(request, post)

    def _answer(self, request: Request, handle: Callable[[], Response]) -> None:
        strings = self.server.app.strings
        try:
            response = handle()
        except BadRequest as err:
            response = Response(error_page(request, strings, strings(request.lang, err.key, **err.params), err.back),
                                status=400)
        except Exception as err:  # noqa: BLE001 - the person sees it; the server keeps serving
            log.exception("%s %s failed", self.command, self.path)
            response = Response(error_page(request, strings, strings(request.lang, "server_error", error=err)),
                                status=500)
        body = response.body.encode("utf-8")
        self.send_response(response.status)
        if response.location:
            self.send_header("Location", response.location)
        for cookie in response.cookies:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: App, host: str, port: int):
        self.app = app
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def start_web_server(app: App, host: str = "127.0.0.1", port: int = 0) -> WebServer:
    """Serve ``app`` in a daemon thread (port 0 picks a free one); ``.url`` says where, ``.shutdown()`` stops it."""
    try:
        server = WebServer(app, host, port)
    except OSError as err:
        raise SystemExit(f"cannot serve a page on {host}:{port}: {err.strerror or err}") from None
    threading.Thread(target=server.serve_forever, args=(0.1,), name="web-page", daemon=True).start()
    return server
