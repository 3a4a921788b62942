"""Check a rendered Jupyter Book page by page, from disk and offline, the way a reader sees it.

Every HTML page of a built book (``_build/html``) is checked twice:

* **statically** (BeautifulSoup on the HTML file, no browser needed): cell error outputs, Python tracebacks,
  ipywidgets outputs that render blank in a static page, images whose files are missing, ``to_jshtml`` players
  without embedded frames, and resources (images, scripts, frames, media, stylesheets) loaded from the network;
* **in headless Chromium** (``file://`` URLs, every network request sent to a proxy that does not exist): the page
  is loaded, its scripts run, then the DOM is inspected: images that did not decode (``naturalWidth == 0``), players
  whose frames do not display, blank widgets, error / traceback / widget messages in the rendered text, maths left
  untypeset, files the page failed to load and requests that left the machine. A screenshot of each page can be
  saved.

Chromium is driven by Playwright (``playwright`` in requirements.txt) with the system's browser, Debian's
``chromium`` (``$CHROMIUM`` or the first Chromium on PATH), so ``playwright install`` is never needed; the static
checks need only BeautifulSoup (a dependency of the book theme).

Findings are errors (the page is broken for a reader) or warnings (worth knowing, not failing): e.g. the
Font Awesome stylesheet that matplotlib's player links from a CDN only styles its buttons (the book theme bundles
the icons), and MathJax is loaded from a CDN by Sphinx unless ``mathjax_path`` points to a local copy. With
``strict_network`` every resource from the network is an error.

Usage::

    python .ci/check_book.py _build/html --screenshots _build/screenshots
    python .ci/check_book.py _build/html --no-browser          # static checks only
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlsplit

ERROR = "error"
WARNING = "warning"

# Folders of a Sphinx build that hold assets and sources, not pages.
SKIPPED_DIRS = {"_static", "_sources", "_images", "_downloads", "_panels_static", ".doctrees", "jupyter_execute"}

WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"

TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\)")
# An exception line as Python prints it last in a traceback ("ValueError: ...", "torch.OutOfMemoryError: ...").
EXCEPTION_LINE_RE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b(?::|$)", re.M)
# What ipywidgets / widget managers / Jupyter frontends show in place of a widget that cannot render.
WIDGET_MESSAGE_RE = re.compile(
    r"Loading widgets?\.\.\.|Error displaying widget|widget could not be displayed|Widget Javascript not detected"
    r"|Error rendering Jupyter widget|Failed to (?:load|display|create) (?:the )?(?:widget|model)"
    r"|Could not (?:create|find) (?:a )?(?:widget|model)|model not found",
    re.I)
# Kernel status messages of a frontend (shown in cell outputs / live-code boxes of a page that needs a kernel).
KERNEL_MESSAGE_RE = re.compile(
    r"\bkernel (?:not (?:connected|running|found|ready)|required|is (?:busy|starting|restarting|dead|disconnected))\b"
    r"|\b(?:waiting for|connecting to|starting|no) (?:a |the )?kernel\b|\bkernel (?:died|restarting)\b"
    r"|\bRun the cell to (?:see|show|display)\b",
    re.I)
# The text/plain repr of an ipywidgets object, shown when its widget view is dropped.
WIDGET_REPR_RE = re.compile(
    r"^\s*(?:interactive|interactive_output|[A-Z]\w*(?:Slider|Box|Button|Buttons|Dropdown|Text|Textarea|Output|Play"
    r"|Tab|Tabs|Accordion|Checkbox|Progress|Label|HTML|HTMLMath|Image|Select|SelectMultiple|Picker|Stack))"
    r"\((?:children|value|description|layout|options|index|min|max)=",
    re.M)

# Tags that load a resource, and the attributes naming it.
RESOURCE_ATTRS = {
    "img": ("src",), "script": ("src",), "iframe": ("src",), "frame": ("src",), "embed": ("src",),
    "video": ("src", "poster"), "audio": ("src",), "source": ("src",), "track": ("src",), "object": ("data",),
    "input": ("src",), "link": ("href",),
}
LINK_RESOURCE_RELS = {"stylesheet", "preload", "modulepreload", "icon", "shortcut", "apple-touch-icon", "manifest"}
# A resource loaded from the network by one of these tags in the page body stops a figure / player from showing.
FIGURE_TAGS = {"img", "script", "iframe", "frame", "embed", "video", "audio", "source", "track", "object", "input"}

# JavaScript errors of the book theme itself that do not affect a page's content: sphinx-thebe declares its
# configuration constant on every page load.
BENIGN_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)

PLAYER_FRAME_RE = re.compile(r"frames\[(\d+)\]\s*=\s*\"(data:image/[\w.+-]+;base64,)")
PLAYER_FILE_FRAMES_RE = re.compile(r"frames\[i\]\s*=\s*\"([^\"]*)\"")
# Markdown a reader sees as raw text: a pipe table's delimiter row, an ATX heading, emphasis markers. Looked for in
# the text blocks of the page content (paragraphs, list items, table cells), never in code.
MD_TABLE_RE = re.compile(r"^\s*\|.*\|\s*:?-{3,}:?\s*\|", re.S)
MD_HEADING_RE = re.compile(r"^\s*#{1,6}\s+\S")
MD_EMPHASIS_RE = re.compile(r"(?<![\w*])(\*\*|__)(?=\S)[^*_\n]+?(?<=\S)\1(?![\w*])")


@dataclass(frozen=True)
class Finding:
    """One problem found on a page.

    Attributes:
        page: the page, relative to the book root (``notebooks/02_voxelmorph.html``).
        kind: ``cell-error``, ``traceback``, ``widget``, ``kernel``, ``missing-image``, ``player``, ``network``,
            ``math``, ``missing-file``, ``javascript`` or ``load``.
        message: what is wrong, for a reader of the report.
        severity: ``"error"`` (fails the page) or ``"warning"``.
        target: what it is about (a URL, a file, an element id), used to merge the static and browser findings.
    """

    page: str
    kind: str
    message: str
    severity: str = ERROR
    target: str = ""

    def __str__(self) -> str:
        return f"{self.severity}: {self.page}: [{self.kind}] {self.message}"


# ------------------------------------------------------------------------------------------------------ pages

def html_pages(root: str | Path) -> list[Path]:
    """Every HTML page of a built book, sorted (asset and source folders excluded)."""
    root = Path(root)
    pages = []
    for path in sorted(root.rglob("*.html")):
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]):
            pages.append(path)
    return pages


def _rel(page: Path, root: Path) -> str:
    try:
        return page.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return page.name


def is_external(url: str) -> bool:
    """True for a URL that needs the network (``http(s)://``, ``//host/...``, ``ws(s)://``)."""
    url = url.strip()
    return url.startswith("//") or urlsplit(url).scheme.lower() in {"http", "https", "ws", "wss", "ftp"}


def local_file(url: str, page: Path) -> Path | None:
    """The file a relative (or ``file://``) URL of ``page`` points to; None for data:, external or empty URLs."""
    url = url.strip()
    if not url or is_external(url) or url.startswith("#"):
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme:  # data:, blob:, javascript:, about:
        return None
    if not parts.path:
        return None
    return (page.parent / unquote(parts.path)).resolve()


def _merge(findings: Iterable[Finding]) -> list[Finding]:
    """Drop repeated findings (same page, kind and target; the first, i.e. the static one, is kept)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in findings:
        key = (f.page, f.kind, f.target or f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


# ----------------------------------------------------------------------------------------------- static check

def _soup(html: str):
    from bs4 import BeautifulSoup

    return BeautifulSoup(html, "html.parser")


def _content(soup):
    """The page's own content (the article of the book theme), without the navigation chrome."""
    return soup.find("article") or soup.find(attrs={"role": "main"}) or soup.find("main") or soup.body or soup


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def redirect_target(page: str | Path) -> str | None:
    """The URL a redirect-only page (``<meta http-equiv="refresh" content="0; url=...">``) sends to, else None."""
    head = Path(page).read_text(encoding="utf-8", errors="replace")[:4000]
    m = re.search(r"<meta[^>]+http-equiv=[\"']?refresh[\"']?[^>]*content=[\"']\s*\d+\s*;\s*url=([^\"'>]+)", head, re.I)
    return m.group(1).strip() if m else None


def check_static(page: str | Path, root: str | Path | None = None, strict_network: bool = False) -> list[Finding]:
    """Check one HTML file without a browser.

    Args:
        page: the HTML file.
        root: the book root (for the page names in findings); default the page's folder.
        strict_network: make every resource loaded from the network an error (default: only those a figure or
            player in the page content needs).

    Returns:
        the findings, errors and warnings.
    """
    page = Path(page)
    root = Path(root) if root is not None else page.parent
    name = _rel(page, root)
    soup = _soup(page.read_text(encoding="utf-8", errors="replace"))
    content = _content(soup)
    found: list[Finding] = []

    def add(kind: str, message: str, severity: str = ERROR, target: str = "") -> None:
        found.append(Finding(name, kind, message, severity, target))

    redirect = redirect_target(page)
    if redirect is not None:
        path = local_file(redirect, page)
        if path is not None and not path.is_file():
            add("missing-file", f"redirects to a page that does not exist: {redirect}", target=path.as_posix())

    # Cell outputs: MyST-NB renders an error output as ``div.output.traceback`` and a stderr stream as
    # ``div.output.stderr`` inside ``div.cell_output``.
    outputs = content.select(".cell_output")
    for out in content.select(".output.traceback, .output.error"):
        add("cell-error", f"cell error output: {_short(out.get_text())}", target=f"tb:{_short(out.get_text(), 60)}")
    for out in content.select(".output.stderr"):
        text = out.get_text()
        if TRACEBACK_RE.search(text) or EXCEPTION_LINE_RE.search(text):
            add("cell-error", f"error on stderr: {_short(text)}", target=f"tb:{_short(text, 60)}")
        elif text.strip():
            add("cell-error", f"stderr output shown: {_short(text)}", WARNING)
    text = content.get_text("\n")
    for k, m in enumerate(TRACEBACK_RE.finditer(text)):
        snippet = text[m.start(): m.start() + 300]
        add("traceback", f"Python traceback in the page: {_short(snippet)}", target=f"traceback#{k}")

    # Widgets: a widget view in a static page is an empty <script> placeholder (blank without a kernel or a
    # widget manager from a CDN); a dropped view leaves the widget's text repr; widget managers and frontends
    # print messages instead of the widget.
    for k, script in enumerate(soup.find_all("script", attrs={"type": WIDGET_VIEW_MIME})):
        add("widget", f"ipywidgets output with no static fallback (renders blank): {_short(script.get_text(), 80)}",
            target=f"widget-view#{k}")
    for m in WIDGET_MESSAGE_RE.finditer(text):
        add("widget", f"widget placeholder message: {m.group(0)!r}", target=f"msg:{m.group(0).lower()}")
    output_text = "\n".join(o.get_text("\n") for o in outputs)
    for m in WIDGET_REPR_RE.finditer(output_text):
        line = output_text[m.start():].strip().splitlines()[0]
        add("widget", f"widget shown as its text repr (no view): {_short(line, 80)}")
    for m in KERNEL_MESSAGE_RE.finditer(output_text):
        add("kernel", f"kernel message in a cell output: {m.group(0)!r}", target=f"msg:{m.group(0).lower()}")

    # Markdown that did not render: MyST-NB parses ``text/markdown`` outputs with CommonMark unless
    # ``nb_render_markdown_format`` says otherwise, and CommonMark has no tables, so a table output becomes one
    # paragraph of pipes. Prose and outputs alike: any text block outside code that still shows Markdown syntax.
    for k, block in enumerate(content.find_all(["p", "li", "td", "th", "dd"])):
        if block.find_parent(["pre", "code"]) is not None:
            continue
        raw = block.get_text()
        if MD_TABLE_RE.search(raw):
            add("markdown", f"unrendered Markdown table: {_short(raw)}", target=f"md-table#{k}")
        elif block.name == "p" and MD_HEADING_RE.match(raw):
            add("markdown", f"unrendered Markdown heading: {_short(raw)}", target=f"md-heading#{k}")
        else:
            bare = "".join(t for t in block.find_all(string=True) if t.find_parent(["code", "pre"]) is None)
            if MD_EMPHASIS_RE.search(bare):
                add("markdown", f"unrendered Markdown emphasis: {_short(raw)}", target=f"md-emphasis#{k}")

    # Images: every local image file must exist, every data: URI must carry data.
    for img in soup.find_all("img"):
        src = (img.get("src") or "").strip()
        in_player = img.find_parent(class_="animation") is not None
        if not src:
            if not in_player:  # a player's <img> gets its src from the player's script
                add("missing-image", f"<img> without src (alt={img.get('alt')!r})")
            continue
        if src.startswith("data:"):
            if "," not in src or not src.split(",", 1)[1].strip():
                add("missing-image", "<img> with an empty data: URI")
            continue
        path = local_file(src, page)
        if path is not None and not path.is_file():
            add("missing-image", f"image file missing: {src}", target=path.as_posix())

    # Players (matplotlib ``to_jshtml``): ``div.animation`` with ``<img id="_anim_img<uid>">``; the frames are
    # assigned in the script that sets ``img_id`` to that id, embedded as ``frames[k] = "data:image/png;base64,..."``.
    scripts = [s.get_text() for s in soup.find_all("script") if not s.get("src")]
    for div in soup.select("div.animation"):
        img = div.find("img", id=re.compile(r"^_anim_img"))
        if img is None:
            add("player", "player (div.animation) without its frame <img>")
            continue
        uid = img["id"]
        script = next((s for s in scripts if f'"{uid}"' in s and "frames" in s), None)
        if script is None:
            add("player", f"player {uid}: the script that loads its frames is missing", target=f"player:{uid}")
            continue
        count = re.search(r"new Array\((\d+)\)", script)
        declared = int(count.group(1)) if count else None
        embedded = len(PLAYER_FRAME_RE.findall(script))
        if embedded == 0:
            files = PLAYER_FILE_FRAMES_RE.findall(script)
            how = f"frames are files ({files[0]!r}...), not embedded" if files else "no frames"
            add("player", f"player {uid} has no embedded frames: {how}", target=f"player:{uid}")
        elif declared is not None and embedded < declared:
            add("player", f"player {uid}: {embedded} of {declared} frames embedded", target=f"player:{uid}")

    # Resources from the network.
    for tag, attrs in RESOURCE_ATTRS.items():
        for el in soup.find_all(tag):
            if tag == "link" and not LINK_RESOURCE_RELS.intersection(r.lower() for r in (el.get("rel") or [])):
                continue
            for attr in attrs:
                url = (el.get(attr) or "").strip()
                if not url or not is_external(url):
                    continue
                in_content = content is soup or any(parent is content for parent in el.parents)
                needed = in_content and tag in FIGURE_TAGS
                where = "in the page content" if in_content else "in the page template"
                why = _network_reason(tag, url, in_content)
                add("network", f"<{tag} {attr}> from the network {where}: {url} ({why})",
                    ERROR if (needed or strict_network) else WARNING, target=url)
    return found


def _network_reason(tag: str, url: str, in_content: bool) -> str:
    if "mathjax" in url.lower():
        return "maths are not typeset offline; set sphinx.config.mathjax_path to a local copy"
    if tag == "link":
        return "styling only" if in_content else "theme styling"
    if in_content:
        return "a figure or player needs it"
    return "theme script"


# ---------------------------------------------------------------------------------------------- the browser

def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """Chromium did not start, crashed, or did not answer in time."""


# Playwright's synchronous API runs one driver per thread: the browsers open at the same time share it.
_DRIVER: dict[str, Any] = {"playwright": None, "users": 0}


def _playwright_driver() -> Any:
    from playwright.sync_api import sync_playwright

    if _DRIVER["playwright"] is None:
        _DRIVER["playwright"] = sync_playwright().start()
    _DRIVER["users"] += 1
    return _DRIVER["playwright"]


def _release_playwright_driver() -> None:
    _DRIVER["users"] -= 1
    if _DRIVER["users"] <= 0 and _DRIVER["playwright"] is not None:
        driver, _DRIVER["playwright"], _DRIVER["users"] = _DRIVER["playwright"], None, 0
        driver.stop()


class Chromium:
    """Headless Chromium with no network, driven by Playwright.

    Playwright launches the system's Chromium (Debian's ``chromium``, never a downloaded browser) with every request
    for a non-local URL sent to a proxy on a closed port of the loopback interface, so it fails at once
    (``net::ERR_PROXY_CONNECTION_FAILED``) and is reported; nothing leaves the machine. Each page is loaded in a
    fresh tab of a 1280 x 2000 viewport. Use as a context manager::

        with Chromium() as browser:
            result = browser.visit(Path("_build/html/index.html"), screenshot=Path("index.png"))
    """

    # Playwright adds its own automation flags (a temporary profile, --no-default-browser-check, --mute-audio,
    # --hide-scrollbars, ...) and the proxy below.
    FLAGS = (
        "--headless=new", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    )
    PROXY = {"server": "127.0.0.1:9", "bypass": "<-loopback>"}

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 2000,
                 timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("chromium is not installed (Debian: apt-get install chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self._playwright: Any = None
        self._browser: Any = None
        self._context: Any = None

    def __enter__(self) -> "Chromium":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        try:
            from playwright.sync_api import Error as PlaywrightError
        except ImportError as e:
            raise BrowserError("playwright is not installed (pip install -r requirements.txt)") from e
        try:
            self._playwright = _playwright_driver()
            self._browser = self._playwright.chromium.launch(
                executable_path=self.executable, headless=True, args=list(self.FLAGS), proxy=self.PROXY,
                timeout=self.timeout * 1000)
            self._context = self._browser.new_context(
                viewport={"width": self.width, "height": self.height}, device_scale_factor=1)
        except PlaywrightError as e:
            self.close()
            raise BrowserError(f"chromium did not start: {e}") from e

    def close(self) -> None:
        closers = [self._context and self._context.close, self._browser and self._browser.close,
                   self._playwright and _release_playwright_driver]
        self._playwright = self._browser = self._context = None
        for close in closers:
            if close:
                try:
                    close()
                except Exception:  # the browser may be gone already; nothing is left to clean up
                    pass

    # -- one page

    def visit(self, page: Path, screenshot: Path | None = None, settle: float = 0.5) -> dict[str, Any]:
        """Load ``page`` from disk in a fresh tab, let its scripts run, and inspect the DOM.

        Returns:
            ``{"loaded": bool, "dom": {...} (see ``DOM_PROBE``), "requests": [(url, type)], "failed":
            [(url, type, error)], "exceptions": [str]}``; types are the DevTools protocol's resource types
            (``Image``, ``Script``, ``Document``, ...).
        """
        from playwright.sync_api import Error as PlaywrightError, TimeoutError as PlaywrightTimeout

        if self._context is None:
            raise BrowserError("the browser is not started")
        requests: list[tuple[str, str]] = []
        failed: list[tuple[str, str, str]] = []
        exceptions: list[str] = []

        def on_failed(request: Any) -> None:
            failed.append((request.url, _resource_type(request), request.failure or ""))

        def on_error(error: Any) -> None:
            exceptions.append(error.stack or (f"{error.name}: {error.message}" if error.name else error.message)
                              or "JavaScript error")

        loaded, dom = False, None
        try:
            tab = self._context.new_page()
        except PlaywrightError as e:
            raise BrowserError(f"no new tab: {e}") from e
        try:
            tab.set_default_timeout(self.timeout * 1000)
            tab.on("request", lambda request: requests.append((request.url, _resource_type(request))))
            tab.on("requestfailed", on_failed)
            tab.on("pageerror", on_error)
            try:
                tab.goto(page.resolve().as_uri(), wait_until="load")
                loaded = True
            except PlaywrightTimeout:
                pass
            tab.wait_for_timeout(settle * 1000)  # players start from a setTimeout(0); theme scripts run on load
            if loaded:
                dom = tab.evaluate(DOM_PROBE)
            tab.wait_for_timeout(100)
            if screenshot is not None and loaded:  # the whole page (up to 20,000 px), as a reader scrolls it
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=screenshot, type="png", full_page=True,
                               clip={"x": 0, "y": 0, "width": self.width, "height": 20000})
        except PlaywrightError as e:
            raise BrowserError(str(e).splitlines()[0]) from e
        finally:
            try:
                tab.close()
            except PlaywrightError:
                pass
        return {"loaded": loaded, "dom": dom, "requests": requests, "failed": failed, "exceptions": exceptions}


def _resource_type(request: Any) -> str:
    """A request's resource type as the DevTools protocol names it (``Image``, ``XHR``), as the findings show it."""
    kind = request.resource_type
    return _DEVTOOLS_TYPES.get(kind, kind[:1].upper() + kind[1:])


_DEVTOOLS_TYPES = {"xhr": "XHR", "texttrack": "TextTrack", "eventsource": "EventSource", "websocket": "WebSocket",
                   "signedexchange": "SignedExchange", "cspviolationreport": "CSPViolationReport"}


# Runs in the page once it has loaded: waits for every image (players' frames included) to load or fail, then
# reports images, players, widget placeholders and the rendered text of the page content.
DOM_PROBE = r"""
(async () => {
  const settle = (img) => (img.complete ? Promise.resolve() : new Promise((ok) => {
    img.addEventListener('load', ok); img.addEventListener('error', ok); setTimeout(ok, 10000); }));
  document.querySelectorAll('img[loading="lazy"]').forEach((img) => { img.loading = 'eager'; });
  const players = Array.from(document.querySelectorAll('div.animation'));
  const anims = players.map((div) => {
    const img = div.querySelector('img[id^="_anim_img"]');
    const anim = img ? window['anim' + img.id.slice('_anim_img'.length)] : undefined;
    return {img, frames: anim && anim.frames ? Array.from(anim.frames) : null};
  });
  const frameImgs = anims.flatMap((a) => a.frames || []);
  await Promise.all([...Array.from(document.images), ...frameImgs].map(settle));
  const content = document.querySelector('article') || document.querySelector('main') || document.body;
  const shown = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  return {
    images: Array.from(document.images).filter((img) => !img.closest('div.animation')).map((img) => ({
      src: (img.getAttribute('src') || '').slice(0, 300), complete: img.complete, width: img.naturalWidth,
      shown: shown(img)})),
    players: anims.map((a, k) => ({
      id: a.img ? a.img.id : '(no img)',
      src: a.img ? (a.img.getAttribute('src') || '').slice(0, 80) : '',
      width: a.img ? a.img.naturalWidth : 0,
      frames: a.frames ? a.frames.length : -1,
      broken: a.frames ? a.frames.filter((f) => !f.naturalWidth).map((f) => f.src) : []})),
    widgets: Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'))
      .map((s) => s.textContent.slice(0, 200)),
    math: document.querySelectorAll('.math, span.math, div.math').length,
    typeset: document.querySelectorAll('mjx-container, .MathJax, .MathJax_Display, .katex').length,
    text: content ? content.innerText : '',
    // text blocks (outside code) that still show a Markdown table's delimiter row
    markdown: content ? Array.from(content.querySelectorAll('p, li, td, th, dd'))
      .filter((el) => !el.closest('pre, code')).map((el) => el.innerText)
      .filter((t) => /\|\s*:?-{3,}:?\s*\|/.test(t)).map((t) => t.slice(0, 200)) : [],
    // display equations wider than the column they sit in (clipped or cut at the left edge)
    wideMath: content ? Array.from(content.querySelectorAll('mjx-container[display="true"]')).map((el) => {
      const box = (el.closest('div.math') || el.parentElement).getBoundingClientRect();
      const math = (el.querySelector('mjx-math') || el).getBoundingClientRect();
      return {tex: (el.closest('div.math') || el).getAttribute('id') || el.textContent.slice(0, 60),
              width: Math.round(math.width), box: Math.round(box.width),
              cut: math.left < box.left - 1 || math.right > box.right + 1};
    }).filter((m) => m.cut) : [],
    // code blocks whose lines run past the right edge of the column (cut off or hidden behind a scroll bar)
    cutCode: content ? Array.from(content.querySelectorAll('div.cell_input pre, div.cell_output pre'))
      .filter((el) => shown(el) && el.scrollWidth > el.clientWidth + 2)
      .map((el) => ({text: el.textContent.slice(0, 60), width: el.scrollWidth, box: el.clientWidth})) : [],
    // figures in cell outputs shown narrower than 400 CSS pixels (their axis labels and titles are then unreadable)
    narrow: content ? Array.from(content.querySelectorAll('.cell_output img'))
      .filter((img) => !img.closest('div.animation') && shown(img) && img.naturalWidth > 0)
      .map((img) => ({src: (img.getAttribute('src') || '').slice(0, 80), width: Math.round(img.width),
                      natural: img.naturalWidth}))
      .filter((img) => img.width < 400) : [],
  };
})()
"""


def check_in_browser(browser: Chromium, page: str | Path, root: str | Path | None = None,
                     screenshot: Path | None = None, strict_network: bool = False) -> list[Finding]:
    """Load one page in ``browser`` and check what a reader sees.

    Args:
        browser: a started :class:`Chromium`.
        page: the HTML file.
        root: the book root (for the page names in findings); default the page's folder.
        screenshot: where to save a PNG of the whole page (up to 20,000 px tall), if given.
        strict_network: make every request to the network an error.
    """
    page = Path(page)
    root = Path(root) if root is not None else page.parent
    name = _rel(page, root)
    found: list[Finding] = []

    def add(kind: str, message: str, severity: str = ERROR, target: str = "") -> None:
        found.append(Finding(name, kind, message, severity, target))

    try:
        result = browser.visit(page, screenshot)
    except BrowserError as e:
        return [Finding(name, "load", f"the browser could not check the page: {e}")]
    if not result["loaded"]:
        add("load", f"the page did not finish loading in {browser.timeout:.0f} s")

    for url, kind in result["requests"]:
        if is_external(url):
            needed = kind in {"Image", "Media", "Script", "Document"}
            add("network", f"requested from the network ({kind or 'resource'}): {url}",
                ERROR if (needed and "mathjax" not in url.lower()) or strict_network else WARNING, target=url)
    dom = result["dom"]
    frames = {src for p in (dom or {}).get("players", []) for src in p["broken"]}
    for url, kind, error in result["failed"]:
        if url.startswith("file:") and "NOT_FOUND" in error and url not in frames:  # frames: see players below
            path = Path(unquote(urlsplit(url).path))
            add("missing-image" if kind == "Image" else "missing-file", f"{kind or 'file'} not found: {url}",
                target=path.as_posix())
    for text in result["exceptions"]:
        if not any(b in text for b in BENIGN_JS_ERRORS):
            add("javascript", f"JavaScript error: {_short(text, 200)}", WARNING)

    if dom:
        for img in dom["images"]:
            if img["complete"] and img["width"] == 0 and img["src"] and not is_external(img["src"]):
                path = local_file(img["src"], page)
                add("missing-image", f"image does not display: {_short(img['src'], 100)}",
                    target=path.as_posix() if path else img["src"])
        for p in dom["players"]:
            target = f"player:{p['id']}"
            if p["frames"] < 0:
                add("player", f"player {p['id']} did not start (its script failed or is missing)", target=target)
            elif p["frames"] == 0:
                add("player", f"player {p['id']} has no frames", target=target)
            elif p["broken"] or p["width"] == 0:
                first = f" (e.g. {_short(p['broken'][0], 100)})" if p["broken"] else ""
                add("player", f"player {p['id']}: {len(p['broken'])} of {p['frames']} frames do not display{first}",
                    target=target)
        for k, widget in enumerate(dom["widgets"]):
            add("widget", f"ipywidgets output with no static fallback (renders blank): {_short(widget, 80)}",
                target=f"widget-view#{k}")
        if dom["math"] and not dom["typeset"]:
            add("math", f"{dom['math']} formulas are not typeset (MathJax did not load from disk)",
                ERROR if strict_network else WARNING)
        text = dom["text"]
        for k, m in enumerate(TRACEBACK_RE.finditer(text)):
            add("traceback", f"Python traceback in the rendered page: {_short(text[m.start(): m.start() + 300])}",
                target=f"traceback#{k}")
        for m in WIDGET_MESSAGE_RE.finditer(text):
            add("widget", f"widget placeholder message: {m.group(0)!r}", target=f"msg:{m.group(0).lower()}")
        for k, block in enumerate(dom.get("markdown", [])):
            add("markdown", f"unrendered Markdown table in the rendered page: {_short(block)}", target=f"md-table#{k}")
        for m in dom.get("wideMath", []):
            add("layout", f"display equation {m['tex']!r} is {m['width']} px wide in a {m['box']} px column "
                          "(cut off)", target=f"math:{m['tex']}")
        for k, code in enumerate(dom.get("cutCode", [])):
            add("layout", f"code block {code['width']} px wide in a {code['box']} px column (lines cut off): "
                          f"{_short(code['text'], 60)!r}", target=f"code#{k}")
        for img in dom.get("narrow", []):
            add("layout", f"figure shown {img['width']} px wide (natural {img['natural']} px), under the 400 px at "
                          f"which its text is readable: {_short(img['src'], 60)}", target=f"narrow:{img['src']}")
    return found


# ------------------------------------------------------------------------------------------------ the book

def check_pages(pages: Iterable[str | Path], root: str | Path, browser: bool = True,
                screenshots: str | Path | None = None, strict_network: bool = False,
                chromium: str | None = None) -> dict[str, list[Finding]]:
    """Check pages of a book (static checks, then the browser unless ``browser=False``).

    Returns:
        ``{page name: findings}`` for every page, in order.
    """
    root = Path(root)
    pages = [Path(p) for p in pages]
    report: dict[str, list[Finding]] = {}
    for page in pages:
        report[_rel(page, root)] = check_static(page, root, strict_network)
    if browser and pages:
        with Chromium(chromium) as b:
            for page in pages:
                name = _rel(page, root)
                if redirect_target(page) is not None:
                    continue  # a redirect (the book's index.html): its target is checked as a page itself
                shot = None
                if screenshots is not None:
                    shot = Path(screenshots) / (name[: -len(".html")].replace("/", "__") + ".png")
                report[name] = _merge(report[name] + check_in_browser(b, page, root, shot, strict_network))
    return report


def check_book(root: str | Path, **kwargs: Any) -> dict[str, list[Finding]]:
    """Check every page of the built book at ``root`` (``_build/html``); keyword arguments as :func:`check_pages`."""
    root = Path(root)
    if not (root / "index.html").is_file():
        raise FileNotFoundError(f"{root} is not a built book (no index.html)")
    return check_pages(html_pages(root), root, **kwargs)


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def format_report(report: dict[str, list[Finding]]) -> Iterator[str]:
    for name, findings in report.items():
        n = len(errors(findings))
        yield f"{'FAIL' if n else 'ok  '} {name}" + (f" ({n} error{'s' * (n != 1)})" if n else "")
        for f in sorted(findings, key=lambda f: f.severity != ERROR):
            yield f"     {f.severity}: [{f.kind}] {f.message}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="_build/html", help="the built book (default: _build/html)")
    parser.add_argument("--screenshots", metavar="DIR", help="save a screenshot of every page in DIR")
    parser.add_argument("--no-browser", action="store_true", help="static checks only (no chromium)")
    parser.add_argument("--strict-network", action="store_true", help="any resource from the network is an error")
    args = parser.parse_args(argv)
    report = check_book(args.root, browser=not args.no_browser, screenshots=args.screenshots,
                        strict_network=args.strict_network)
    for line in format_report(report):
        print(line)
    failed = [name for name, findings in report.items() if errors(findings)]
    print(f"\n{len(report)} pages checked, {len(failed)} with errors" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
