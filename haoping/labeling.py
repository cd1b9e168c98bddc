"""The rank-list labeling page: a person ranks a prompt's K generations, best first, and each
ranking is appended to a rank-list file (the format of :mod:`haoping.ranklists`, which
``haoping train-reward-model --train`` reads).

Each person (a browser, known by a cookie) has their own open group: a prompt drawn at random
from the pool, or one they typed, and its K generations. Ranks are given by clicking the texts
in order, by the keys 1-K, or with the selects (which also work without JavaScript). The
dataset view shows how many lists the file holds, how many this person saved, the last lists,
and removes a bad one (into ``<file>.removed``; see :func:`haoping.ranklists.remove_line`).
"""
from __future__ import annotations

import html
import random
import re
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from haoping.log import get_logger
from haoping.ranklists import (RankList, RankListError, append_ranklist, one_line, read_lines, remove_line,
                               removed_path)
from haoping.webpage import (BadRequest, Request, Response, Strings, choices_from_form, error_page, link, page,
                             redirect)

log = get_logger(__name__)

ANNOTATOR_COOKIE = "haoping_annotator"
MAX_ANNOTATORS = 1000  # people remembered by one page (the least recently seen is forgotten first)
RECENT_LISTS = 20      # lists the dataset view shows

STRINGS = Strings({
    "title": ("给评论排序", "Rank the reviews"),
    "nav_label": ("标注", "Label"),
    "nav_dataset": ("数据集", "Dataset"),
    "prompt": ("提示：{prompt}", "Prompt: {prompt}"),
    "how_to": ("按从好到差的顺序点击文本（或按数字键 1–{k}）：第一个点的是最好的。再点一次取消；"
               "退格键撤销上一个，回车键保存。也可以在每条下面选择名次（1 = 最好，{k} = 最差）。",
               "Click the texts from best to worst (or press the keys 1–{k}): the first you click is the best. "
               "Click again to take a rank back; Backspace undoes the last one, Enter saves. "
               "Or pick each text's rank below it (1 = best, {k} = worst)."),
    "rank_label": ("名次", "rank"),
    "save": ("保存排序", "Save ranking"),
    "skip": ("跳过", "Skip"),
    "own_prompt": ("换一个提示：", "Another prompt:"),
    "own_prompt_placeholder": ("输入你自己的提示", "type your own prompt"),
    "use_prompt": ("用这个提示生成", "Generate for this prompt"),
    "random_prompt": ("随机提示", "Random prompt"),
    "progress": ("你保存了 {saved} 条，跳过了 {skipped} 条；{file} 中共有 {total} 条排序列表",
                 "You saved {saved}, skipped {skipped}; rank lists in {file}: {total}"),
    "dataset_title": ("数据集", "Dataset"),
    "dataset_summary": ("{file} 中共有 {total} 条排序列表，其中你保存了 {saved} 条，删除了 {removed} 条。",
                        "{file} holds {total} rank lists; you saved {saved} of them and removed {removed}."),
    "dataset_bad_lines": ("另有 {bad} 行无法读取（下面标出了原因）。", "{bad} more line(s) cannot be read (reasons below)."),
    "dataset_recent": ("最近的 {count} 条（从好到差）", "The last {count} (best first)"),
    "dataset_empty": ("还没有排序列表。", "No rank lists yet."),
    "dataset_keep": ("删除的行连同删除时间保存在 {removed_file} 中，不会丢失。",
                     "A removed line is kept, with the time it was removed, in {removed_file}."),
    "col_line": ("行", "line"),
    "col_texts": ("文本", "texts"),
    "remove": ("删除", "remove"),
    "removed_notice": ("已删除第 {line} 行；它保存在 {removed_file} 中。",
                       "Removed line {line}; it is kept in {removed_file}."),
    "bad_line": ("无法读取：{reason}", "cannot be read: {reason}"),
    "healthy": ("正常", "ok"),
    "draw_failed": ("现在生成不了文本：{error}。稍后刷新页面再试。", "cannot generate texts now: {error}. Reload the page later."),
    # form errors (HTTP 400, nothing saved)
    "rank_fields": ("需要 {count} 条文本的名次（rank_0 到 rank_{last}），收到的名次字段：{fields}",
                    "expected ranks for {count} texts (rank_0 .. rank_{last}), got rank field(s): {fields}"),
    "rank_missing": ("第 {text} 条还没有名次；每条都要有 1 到 {highest} 的名次",
                     "text {text} has no rank; give every text a rank from 1 to {highest}"),
    "rank_bad": ("第 {text} 条：名次 {value} 不是 1 到 {highest} 的整数",
                 "text {text}: rank {value!r} is not a whole number from 1 to {highest}"),
    "rank_repeated": ("名次 {values} 给了不止一条文本；每条文本要有自己的名次",
                      "rank(s) {values} given to more than one text; every text needs its own rank"),
    "group_closed": ("这一组已经保存或跳过了（表单重复提交了？）",
                     "this group was already saved or skipped (a resubmitted form?)"),
    "group_unknown": ("没有这一组（{group}）；刷新页面看当前的一组",
                      "unknown group {group!r}; reload the page to get the current one"),
    "action_unknown": ("未知操作 {action}；只能保存或跳过", "unknown action {action!r}; use save or skip"),
    "prompt_action_unknown": ("未知操作 {action}；只能用输入的提示或随机提示",
                              "unknown action {action!r}; use typed or random"),
    "prompt_empty": ("提示是空的；输入一段文字，或选随机提示", "the prompt is empty; type some text or pick a random prompt"),
    "prompt_too_long": ("提示有 {length} 个字，最多 {limit} 个", "the prompt has {length} characters; at most {limit}"),
    "no_annotator": ("页面不认识你（cookie 丢了？）；刷新页面再试", "this page does not know you (no cookie?); reload and try again"),
    "remove_fields": ("删除表单不对：{problem}", "bad remove form: {problem}"),
    "remove_gone": ("第 {line} 行已经不在文件里了（已经删除了？）", "line {line} is no longer in the file (removed already?)"),
    "not_a_ranklist": ("不是有效的排序列表：{reason}", "not a valid rank list: {reason}"),
})

# Clicks and keys set the same selects the form posts, so a page without JavaScript still works.
RANKING_SCRIPT = """
(() => {
  const items = [...document.querySelectorAll('.item')];
  const selects = items.map(item => item.querySelector('select'));
  const k = items.length;
  const rankOf = i => Number(selects[i].value || 0);
  const show = () => items.forEach((item, i) => {
    item.classList.toggle('ranked', rankOf(i) > 0);
    item.querySelector('.badge').textContent = selects[i].value || '–';
  });
  const pick = i => {
    const rank = rankOf(i);
    if (rank) {  // take it back; the texts ranked after it move up
      selects[i].value = '';
      selects.forEach((s, j) => { if (rankOf(j) > rank) s.value = String(rankOf(j) - 1); });
    } else {
      selects[i].value = String(1 + selects.filter(s => s.value).length);
      const left = selects.filter(s => !s.value);
      if (left.length === 1) left[0].value = String(k);  // the last one is decided
    }
    show();
  };
  items.forEach((item, i) => item.addEventListener('click', event => {
    if (!event.target.closest('select, label')) pick(i);
  }));
  selects.forEach(s => s.addEventListener('change', show));
  document.addEventListener('keydown', event => {
    if (event.target.closest('input, select, textarea') || event.ctrlKey || event.metaKey || event.altKey) return;
    const n = Number(event.key);
    if (Number.isInteger(n) && n >= 1 && n <= k) { pick(n - 1); event.preventDefault(); }
    else if (event.key === 'Backspace') {
      const last = selects.reduce((best, s, j) => (rankOf(j) > (best < 0 ? 0 : rankOf(best)) ? j : best), -1);
      if (last >= 0) pick(last);
      event.preventDefault();
    } else if (event.key === 'Enter' && selects.every(s => s.value)) {
      document.getElementById('save').click();
      event.preventDefault();
    }
  });
  show();
})();
"""


class DrawError(RuntimeError):
    """The texts could not be drawn (e.g. the generator service is down); the page says so."""


@dataclass(frozen=True)
class Group:
    id: str
    prompt: str
    texts: tuple[str, ...]


def ranking_from_form(form: dict[str, str], count: int) -> list[int]:
    """Text indices best first, from fields ``rank_0`` .. ``rank_<count-1>`` holding distinct ranks 1..count.

    Raises :class:`BadRequest` for a missing, extra, non-numeric, out-of-range or repeated rank."""
    try:
        ranks = choices_from_form(form, "rank", count, count, distinct=True)
    except BadRequest as err:
        err.params.setdefault("last", count - 1)
        raise
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
        raise DrawError(f"the policy gave fewer than 2 distinct texts for {prompt!r} in {attempts} draws")
    return texts[:k]


def count_saved(path: Path) -> int:
    """Rank lists in the file (bad lines not counted)."""
    return sum(isinstance(line.parsed, RankList) for line in read_lines(path))


@dataclass
class Annotator:
    """One person (one browser): their open group and what they did on this page."""
    id: str
    current: Group | None = None
    saved: int = 0
    skipped: int = 0
    removed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one draw at a time per person


@dataclass
class RankingApp:
    """The labeling page. GET / shows this person's group, POST /rank saves its ranking (or skips
    it), POST /prompt draws a group for a typed or random prompt, GET /dataset shows the file and
    POST /remove takes a line out of it. GET /healthz answers without drawing.

    ``draw(prompt, n, seed)`` returns ``n`` sampled texts (prompt included). A ranking for a group
    that is not open is refused, so a resubmitted form never saves twice."""
    draw: Callable[[str, int, int], list[str]]
    prompts: list[str]
    out: Path
    k: int = 4
    seed: int = 0
    max_prompt_chars: int = 64
    strings: Strings = STRINGS
    _annotators: OrderedDict = field(default_factory=OrderedDict)  # id -> Annotator, least recent first
    _open: dict = field(default_factory=dict)                        # group id -> Annotator
    _closed: deque = field(default_factory=lambda: deque(maxlen=4096))  # ids already saved or skipped
    _drawn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be at least 2 to rank, got {self.k}")
        if not self.prompts:
            raise ValueError("no prompts")
        self.out = Path(self.out)
        self._rng = random.Random(self.seed)

    def totals(self) -> dict[str, int]:
        """What every person did on this page: lists saved, groups skipped, lines removed."""
        with self._lock:
            people = list(self._annotators.values())
        return {name: sum(getattr(a, name) for a in people) for name in ("saved", "skipped", "removed")}

    # --- people and groups ---

    def _annotator(self, request: Request, create: bool) -> tuple[Annotator | None, list[str]]:
        """The person behind the request's cookie, and the Set-Cookie values to send."""
        given = request.cookies.get(ANNOTATOR_COOKIE, "")
        with self._lock:
            annotator = self._annotators.get(given)
            if annotator is None and create:
                # a cookie from before a restart keeps its id; anything else gets a new one
                annotator = Annotator(given if re.fullmatch(r"[0-9a-f]{32}", given) else secrets.token_hex(16))
                self._annotators[annotator.id] = annotator
                while len(self._annotators) > MAX_ANNOTATORS:
                    _, forgotten = self._annotators.popitem(last=False)
                    if forgotten.current is not None:
                        self._open.pop(forgotten.current.id, None)
            if annotator is not None:
                self._annotators.move_to_end(annotator.id)
        cookies = [] if annotator is None or annotator.id == given else [
            f"{ANNOTATOR_COOKIE}={annotator.id}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"]
        return annotator, cookies

    def _new_group(self, annotator: Annotator, prompt: str | None) -> Group:
        """Draw a group for ``prompt`` (None: one at random from the pool) and make it the person's open one."""
        with self._lock:
            prompt = prompt if prompt is not None else self._rng.choice(self.prompts)
            drawn, self._drawn = self._drawn, self._drawn + 1
        # seeds far apart, so the redraws of one group never reuse another group's seed
        group = Group(secrets.token_hex(8), prompt, tuple(draw_group(self.draw, prompt, self.k,
                                                                     self.seed + 1000 * drawn)))
        with self._lock:
            if annotator.current is not None:
                self._open.pop(annotator.current.id, None)
            annotator.current = group
            self._open[group.id] = annotator
        return group

    def _close(self, annotator: Annotator, group: Group) -> None:
        with self._lock:
            self._open.pop(group.id, None)
            self._closed.append(group.id)
            if annotator.current is group:
                annotator.current = None

    def _group_for(self, group_id: str) -> tuple[Annotator, Group]:
        with self._lock:
            annotator = self._open.get(group_id)
            if annotator is not None and annotator.current is not None and annotator.current.id == group_id:
                return annotator, annotator.current
            if group_id in self._closed:
                raise BadRequest("group_closed")
        raise BadRequest("group_unknown", group=group_id[:32])

    # --- routes ---

    def get(self, request: Request) -> Response:
        try:
            return self._get(request)
        except DrawError as err:
            log.warning("drawing a group failed: %s", err)
            return Response(error_page(request, self.strings, self.strings(request.lang, "draw_failed", error=err)),
                            status=503)

    def _get(self, request: Request) -> Response:
        if request.path == "/healthz":
            return Response(self.strings(request.lang, "healthy"), content_type="text/plain; charset=utf-8")
        if request.path not in ("/", "/dataset"):
            return Response(error_page(request, self.strings, self.strings(request.lang, "no_page",
                                                                             path=request.path)), status=404)
        annotator, cookies = self._annotator(request, create=True)
        if request.path == "/dataset":
            return Response(self.render_dataset(request, annotator), cookies=cookies)
        with annotator.lock:
            group = annotator.current or self._new_group(annotator, None)
        return Response(self.render(request, annotator, group), cookies=cookies)

    def post(self, request: Request) -> Response:
        handlers = {"/rank": self._post_rank, "/prompt": self._post_prompt, "/remove": self._post_remove}
        if request.path not in handlers:
            return Response(error_page(request, self.strings, self.strings(request.lang, "no_form",
                                                                             path=request.path)), status=404)
        return handlers[request.path](request)

    def _post_rank(self, request: Request) -> Response:
        form = request.form
        annotator, group = self._group_for(form.get("group", ""))
        with annotator.lock:
            if annotator.current is not group:  # saved or replaced while this request waited
                raise BadRequest("group_closed")
            action = form.get("action", "save")
            if action not in ("save", "skip"):
                raise BadRequest("action_unknown", action=action[:32])
            if action == "skip":
                annotator.skipped += 1
            else:
                order = ranking_from_form(form, len(group.texts))
                try:
                    append_ranklist(self.out, [group.texts[i] for i in order])
                except RankListError as err:  # the texts were made one-line and distinct when drawn
                    raise BadRequest("not_a_ranklist", reason=str(err)) from None
                annotator.saved += 1
                log.info("saved a rank list to %s (%d by this person)", self.out, annotator.saved)
            self._close(annotator, group)
        return redirect(link("/", request.lang))

    def _post_prompt(self, request: Request) -> Response:
        annotator, _ = self._annotator(request, create=False)
        if annotator is None:
            raise BadRequest("no_annotator")
        action = request.form.get("action", "typed")
        if action not in ("typed", "random"):
            raise BadRequest("prompt_action_unknown", action=action[:32])
        prompt = None
        if action == "typed":
            prompt = one_line(request.form.get("prompt", ""))
            if not prompt:
                raise BadRequest("prompt_empty")
            if len(prompt) > self.max_prompt_chars:
                raise BadRequest("prompt_too_long", length=len(prompt), limit=self.max_prompt_chars)
        with annotator.lock:
            try:
                self._new_group(annotator, prompt)
            except DrawError as err:
                return Response(error_page(request, self.strings,
                                           self.strings(request.lang, "draw_failed", error=err)), status=503)
        return redirect(link("/", request.lang))

    def _post_remove(self, request: Request) -> Response:
        annotator, _ = self._annotator(request, create=False)
        form = request.form
        if annotator is None or not secrets.compare_digest(form.get("token", "").encode(), annotator.id.encode()):
            raise BadRequest("no_annotator", back="/dataset")
        raw_line, digest = form.get("line", "").strip(), form.get("digest", "").strip()
        if not (raw_line.isascii() and raw_line.isdecimal()) or int(raw_line) < 1:
            raise BadRequest("remove_fields", problem=f"line {raw_line[:20]!r}", back="/dataset")
        if not re.fullmatch(r"[0-9a-f]{16}", digest):
            raise BadRequest("remove_fields", problem=f"digest {digest[:20]!r}", back="/dataset")
        removed = remove_line(self.out, int(raw_line), digest)
        if removed is None:
            raise BadRequest("remove_gone", line=raw_line, back="/dataset")
        with self._lock:
            annotator.removed += 1
        log.info("removed line %d of %s into %s", removed.number, self.out, removed_path(self.out))
        return redirect(link("/dataset", request.lang, removed=removed.number))

    # --- pages ---

    def _nav(self, lang: str) -> str:
        return (f'<a href="{html.escape(link("/", lang))}">{self.strings(lang, "nav_label")}</a>'
                f'<a href="{html.escape(link("/dataset", lang))}">{self.strings(lang, "nav_dataset")}</a>')

    def render(self, request: Request, annotator: Annotator, group: Group) -> str:
        t, lang, n = self.strings, request.lang, len(group.texts)
        options = '<option value="">–</option>' + "".join(f'<option value="{r}">{r}</option>'
                                                          for r in range(1, n + 1))
        items = "".join(
            f'<div class="item" id="item_{i}"><span class="badge">–</span><span class="key">[{i + 1}]</span>'
            f'<div class="text">{html.escape(text)}</div>'
            f'<label>{t(lang, "rank_label")} <select name="rank_{i}">{options}</select></label></div>'
            for i, text in enumerate(group.texts))
        total = count_saved(self.out)
        body = (f'<p class="meta">{html.escape(t(lang, "prompt", prompt=group.prompt))}</p>'
                f'<p>{html.escape(t(lang, "how_to", k=n))}</p>'
                f'<form method="post" action="{html.escape(link("/rank", lang))}" accept-charset="utf-8">'
                f'<input type="hidden" name="group" value="{group.id}">{items}<p>'
                f'<button type="submit" id="save" name="action" value="save">{t(lang, "save")}</button>'
                f'<button type="submit" id="skip" name="action" value="skip">{t(lang, "skip")}</button></p></form>'
                f'<form method="post" action="{html.escape(link("/prompt", lang))}" accept-charset="utf-8"><p>'
                f'{t(lang, "own_prompt")} <input type="text" name="prompt" id="prompt" '
                f'maxlength="{self.max_prompt_chars}" placeholder="{html.escape(t(lang, "own_prompt_placeholder"))}"> '
                f'<button type="submit" id="use_prompt" name="action" value="typed">{t(lang, "use_prompt")}</button>'
                f'<button type="submit" id="random_prompt" name="action" value="random">{t(lang, "random_prompt")}'
                f'</button></p></form>'
                f'<p class="meta" id="progress">{html.escape(t(lang, "progress", saved=annotator.saved, skipped=annotator.skipped, file=str(self.out), total=total))}</p>')
        return page(request, t, t(lang, "title"), body, nav=self._nav(lang), script=RANKING_SCRIPT)

    def render_dataset(self, request: Request, annotator: Annotator) -> str:
        t, lang = self.strings, request.lang
        lines = read_lines(self.out)
        good = [line for line in lines if isinstance(line.parsed, RankList)]
        removed_file = str(removed_path(self.out))
        parts = []
        if request.query.get("removed", "").isdecimal():
            parts.append(f'<p class="notice" id="notice">'
                         f'{html.escape(t(lang, "removed_notice", line=request.query["removed"], removed_file=removed_file))}</p>')
        parts.append(f'<p id="summary">{html.escape(t(lang, "dataset_summary", file=str(self.out), total=len(good), saved=annotator.saved, removed=annotator.removed))}')
        if len(good) < len(lines):
            parts.append(" " + html.escape(t(lang, "dataset_bad_lines", bad=len(lines) - len(good))))
        parts.append("</p>")
        recent = lines[-RECENT_LISTS:][::-1]
        if not recent:
            parts.append(f'<p>{t(lang, "dataset_empty")}</p>')
        else:
            parts.append(f'<h2>{html.escape(t(lang, "dataset_recent", count=len(recent)))}</h2><table>'
                         f'<tr><th>{t(lang, "col_line")}</th><th>{t(lang, "col_texts")}</th><th></th></tr>')
            for line in recent:
                if isinstance(line.parsed, RankList):
                    texts = "".join(f"<li>{html.escape(text)}</li>" for text in line.parsed.texts)
                    cell = f"<ol>{texts}</ol>"
                else:
                    cell = (f'<span class="error">{html.escape(t(lang, "bad_line", reason=line.parsed.reason))}</span>'
                            f'<br><code>{html.escape(line.raw.decode("utf-8", "replace")[:300])}</code>')
                parts.append(
                    f'<tr id="line_{line.number}"><td>{line.number}</td><td>{cell}</td><td>'
                    f'<form method="post" action="{html.escape(link("/remove", lang))}">'
                    f'<input type="hidden" name="token" value="{annotator.id}">'
                    f'<input type="hidden" name="line" value="{line.number}">'
                    f'<input type="hidden" name="digest" value="{line.digest}">'
                    f'<button type="submit" class="remove">{t(lang, "remove")}</button></form></td></tr>')
            parts.append("</table>")
        parts.append(f'<p class="meta">{html.escape(t(lang, "dataset_keep", removed_file=removed_file))}</p>')
        return page(request, t, t(lang, "dataset_title"), "".join(parts), nav=self._nav(lang))


# --- where the texts come from ------------------------------------------------------------

def generator_service_draw(address: str, max_new_tokens: int, min_new_tokens: int,
                           timeout: float = 60.0) -> Callable[[str, int, int], list[str]]:
    """Samples from a running Generator service; :class:`DrawError` when it does not answer."""
    import grpc

    from haoping.client import GeneratorClient

    client = GeneratorClient(address, timeout=timeout)

    def draw(prompt: str, n: int, seed: int) -> list[str]:
        try:
            reply = client.generate([prompt], n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0,
                                    top_p=1.0, seed=seed, min_new_tokens=min_new_tokens)
        except grpc.RpcError as err:
            raise DrawError(f"generator {address}: {err.code().name}: {err.details()}") from None
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
