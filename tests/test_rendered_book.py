"""The rendered book, checked page by page in headless Chromium (``.ci/check_book.py``).

* Unit tests of the checker on the tiny handcrafted pages in ``tests/fixtures/rendered_book/``: the good page passes;
  a cell traceback, a blank widget, a missing image, a player without frames and a figure from the network each fail
  it. The static part (HTML only) always runs; the browser part (Playwright driving Debian's ``chromium``) is skipped
  without them.
* The real book: every page of ``$DIFFREG_BOOK_HTML`` (default ``_build/html``) must pass, with a screenshot of each
  saved to ``$DIFFREG_SCREENSHOTS`` (default ``_build/screenshots``). Skipped while the book is not built; ``.ci/run``
  runs it after ``jupyter-book build``::

      DIFFREG_BOOK_HTML=_build/html python -m pytest -q tests/test_rendered_book.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rendered_book"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_book", ROOT / ".ci" / "check_book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


check_book = _load_checker()

CHROMIUM = check_book.find_chromium()
PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
NO_BROWSER = (None if CHROMIUM is not None and PLAYWRIGHT else
              "chromium is not installed (Debian: apt-get install --no-install-recommends chromium)" if PLAYWRIGHT else
              "playwright is not installed (pip install -r requirements.txt)")
needs_chromium = pytest.mark.skipif(
    NO_BROWSER is not None, reason=f"{NO_BROWSER}; the browser half of the rendered-book check needs it")

BOOK = Path(os.environ.get("DIFFREG_BOOK_HTML") or ROOT / "_build" / "html")
SCREENSHOTS = Path(os.environ.get("DIFFREG_SCREENSHOTS") or ROOT / "_build" / "screenshots")

# Each broken fixture page and the kind of finding that must fail it.
BROKEN = {
    "traceback.html": "cell-error",
    "widget.html": "widget",
    "missing_image.html": "missing-image",
    "empty_player.html": "player",
    "network.html": "network",
    "unrendered_table.html": "markdown",
}
# Broken pages that only a browser can see: layout measured after the page is laid out and typeset.
BROKEN_LAYOUT = {
    "wide_equation.html": "layout",
    "narrow_figure.html": "layout",
    "cut_code.html": "layout",
}


def _kinds(findings) -> set[str]:
    return {f.kind for f in check_book.errors(findings)}


# ------------------------------------------------------------------------------- the checker, static part

def test_fixture_pages_are_found():
    names = {p.name for p in check_book.html_pages(FIXTURES)}
    assert names == {"index.html", "good.html", *BROKEN, *BROKEN_LAYOUT}


@pytest.mark.parametrize("name", ["good.html", "index.html"])
def test_static_good_page_passes(name):
    assert check_book.errors(check_book.check_static(FIXTURES / name, FIXTURES)) == []


@pytest.mark.parametrize("name,kind", sorted(BROKEN.items()))
def test_static_broken_page_fails(name, kind):
    assert kind in _kinds(check_book.check_static(FIXTURES / name, FIXTURES))


@pytest.mark.parametrize("name", sorted(BROKEN_LAYOUT))
def test_static_check_cannot_see_layout(name):
    """Layout needs a browser: the static check passes these pages, so the browser check must not be skipped."""
    assert check_book.errors(check_book.check_static(FIXTURES / name, FIXTURES)) == []


def test_static_traceback_is_also_a_traceback():
    assert "traceback" in _kinds(check_book.check_static(FIXTURES / "traceback.html", FIXTURES))


def _page(tmp_path: Path, body: str) -> Path:
    page = tmp_path / "page.html"
    page.write_text(f"<html><body><article>{body}</article></body></html>", encoding="utf-8")
    return page


@pytest.mark.parametrize("body,kind", [
    ('<div class="cell_output"><div class="output stderr"><pre>ValueError: bad shape</pre></div></div>',
     "cell-error"),
    ('<div class="cell_output"><div class="output stream"><pre>Traceback (most recent call last):\n'
     '  File "x.py", line 1</pre></div></div>', "traceback"),
    ('<div class="cell_output"><pre class="output text_plain">Error displaying widget: model not found</pre></div>',
     "widget"),
    ('<div class="cell_output"><pre class="output text_plain">Loading widgets...</pre></div>', "widget"),
    ('<div class="cell_output"><pre class="output text_plain">interactive(children=(IntSlider(value=5, '
     'description=\'t\'), Output()))</pre></div>', "widget"),
    ('<div class="cell_output"><pre class="output text_plain">Waiting for kernel...</pre></div>', "kernel"),
    ('<div class="cell_output"><img src=""></div>', "missing-image"),
    ('<div class="cell_output"><img src="data:image/png;base64,"></div>', "missing-image"),
    ('<div class="animation"><img id="_anim_imgabc"></div>'
     '<script>var img_id = "_anim_imgabc"; var frames = new Array(0);</script>', "player"),
    ('<div class="cell_output"><script src="https://cdn.example.invalid/plotly.js"></script></div>', "network"),
    ('<div class="cell_output"><p>| a | b |\n|:---|---:|\n| 1 | 2 |</p></div>', "markdown"),
    ('<div class="cell_output"><p>## Results on the held-out pairs</p></div>', "markdown"),
    ('<div class="cell_output"><p>the **registered** Dice</p></div>', "markdown"),
    ('<ul><li>paper: __0.84__ overall</li></ul>', "markdown"),
])
def test_static_detects(tmp_path, body, kind):
    assert kind in _kinds(check_book.check_static(_page(tmp_path, body), tmp_path))


@pytest.mark.parametrize("body", [
    '<p>The kernel of the Gaussian smooths the field; the score is a gradient.</p>',
    '<div class="cell_output"><div class="output stream"><pre>Dice 0.812 +- 0.03</pre></div></div>',
    '<div class="cell_output"><img src="data:image/png;base64,iVBORw0KGgo="></div>',
    '<table><tr><th>method</th><th>dice</th></tr><tr><td>VoxelMorph</td><td>0.81</td></tr></table>',
    '<p>the score is <code>a**2 + b**2</code> and |x| is a norm; <strong>bold</strong> renders</p>',
    '<p>#3 of 8 pairs; p = 0.03 | q</p>',
])
def test_static_clean_content_passes(tmp_path, body):
    assert check_book.errors(check_book.check_static(_page(tmp_path, body), tmp_path)) == []


def test_network_outside_content_is_a_warning(tmp_path):
    page = tmp_path / "page.html"
    page.write_text('<html><head><script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js">'
                    '</script></head><body><article><p>text</p></article></body></html>', encoding="utf-8")
    findings = check_book.check_static(page, tmp_path)
    assert [f.kind for f in findings] == ["network"] and findings[0].severity == check_book.WARNING
    assert _kinds(check_book.check_static(page, tmp_path, strict_network=True)) == {"network"}


def test_redirect_to_a_missing_page_fails(tmp_path):
    page = tmp_path / "index.html"
    page.write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />', encoding="utf-8")
    assert check_book.redirect_target(page) == "book/intro.html"
    assert _kinds(check_book.check_static(page, tmp_path)) == {"missing-file"}


# ------------------------------------------------------------------------------ the checker, in the browser

@pytest.fixture(scope="module")
def browser():
    with check_book.Chromium(CHROMIUM, timeout=60) as b:
        yield b


@needs_chromium
def test_browser_good_page_passes(browser, tmp_path):
    shot = tmp_path / "good.png"
    findings = check_book.check_in_browser(browser, FIXTURES / "good.html", FIXTURES, shot)
    assert check_book.errors(findings) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
@pytest.mark.parametrize("name,kind", sorted(BROKEN.items()))
def test_browser_broken_page_fails(browser, name, kind):
    """The browser alone (without the static check) sees each failure as a reader would."""
    kinds = _kinds(check_book.check_in_browser(browser, FIXTURES / name, FIXTURES))
    expected = "traceback" if kind == "cell-error" else kind  # the browser sees a traceback in the text
    assert expected in kinds


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@needs_chromium
@pytest.mark.parametrize("height,expected", [(5000, 5000), (30000, 20000)])
def test_browser_screenshot_is_the_whole_page(browser, tmp_path, height, expected):
    """The screenshot shows the page as a reader scrolls it, not its first screen, up to 20,000 px."""
    page = tmp_path / "tall.html"
    page.write_text(f'<html><body style="margin:0"><article><div style="height:{height}px">tall</div></article>'
                    '</body></html>', encoding="utf-8")
    shot = tmp_path / "tall.png"
    assert check_book.errors(check_book.check_in_browser(browser, page, tmp_path, shot)) == []
    assert _png_size(shot) == (1280, expected)


@needs_chromium
def test_browser_reports_blocked_requests_at_once(browser, tmp_path):
    """Offline, a request to another host fails at once (no wait for a timeout) and is still reported."""
    page = tmp_path / "page.html"
    page.write_text('<html><head><script src="https://cdn.example.invalid/theme.js"></script></head><body><article>'
                    '<img src="https://example.invalid/figure.png"><script>fetch("https://api.example.invalid/x")'
                    '.catch(() => {});</script></article></body></html>', encoding="utf-8")
    start = time.monotonic()
    result = browser.visit(page)
    assert result["loaded"] and time.monotonic() - start < 20  # the browser's timeout is 60 s
    assert {("https://cdn.example.invalid/theme.js", "Script"), ("https://example.invalid/figure.png", "Image"),
            ("https://api.example.invalid/x", "Fetch")} <= set(result["requests"])
    assert {url for url, _, _ in result["failed"]} >= {"https://example.invalid/figure.png",
                                                      "https://cdn.example.invalid/theme.js"}
    findings = check_book.check_in_browser(browser, page, tmp_path)
    assert {f.target for f in check_book.errors(findings) if f.kind == "network"} == {
        "https://cdn.example.invalid/theme.js", "https://example.invalid/figure.png"}


@needs_chromium
@pytest.mark.parametrize("name,kind", sorted(BROKEN_LAYOUT.items()))
def test_browser_layout_page_fails(browser, name, kind):
    assert kind in _kinds(check_book.check_in_browser(browser, FIXTURES / name, FIXTURES))


@needs_chromium
def test_check_pages_reports_each_fixture(tmp_path):
    report = check_book.check_pages(check_book.html_pages(FIXTURES), FIXTURES, screenshots=tmp_path,
                                    chromium=CHROMIUM)
    failed = {name for name, findings in report.items() if check_book.errors(findings)}
    assert failed == set(BROKEN) | set(BROKEN_LAYOUT)
    assert (tmp_path / "good.png").is_file() and not (tmp_path / "index.png").exists()  # index.html redirects


# ---------------------------------------------------------------------------------------------- the real book

def _book_pages() -> list:
    if not (BOOK / "index.html").is_file():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"the book is not built ({BOOK}/index.html missing); .ci/run checks it after jupyter-book build"))]
    return [pytest.param(page, id=page.relative_to(BOOK).as_posix()) for page in check_book.html_pages(BOOK)]


@pytest.fixture(scope="module")
def book_browser():
    if NO_BROWSER is not None:
        if os.environ.get("DIFFREG_BOOK_HTML"):  # asked for explicitly (.ci/run): a skip would hide a broken check
            pytest.fail(NO_BROWSER)
        pytest.skip(NO_BROWSER)
    with check_book.Chromium(CHROMIUM, timeout=120) as b:
        yield b


@pytest.mark.parametrize("page", _book_pages())
def test_rendered_book_page(page, book_browser):
    """One page of the built book: no error output, traceback, blank widget, missing image or empty player, and
    nothing comes from the network: the book bundles MathJax (book/_static/mathjax), so its formulas are typeset
    offline too. Other warnings are reported."""
    name = page.relative_to(BOOK).as_posix()
    findings = check_book.check_static(page, BOOK)
    if check_book.redirect_target(page) is None:
        shot = SCREENSHOTS / (name[: -len(".html")].replace("/", "__") + ".png")
        findings = check_book._merge(findings + check_book.check_in_browser(book_browser, page, BOOK, shot))
    for f in findings:
        if f.severity != check_book.ERROR:
            warnings.warn(str(f), UserWarning, stacklevel=1)
    bad = check_book.errors(findings) + [f for f in findings if f.kind in ("math", "network")
                                         and f.severity != check_book.ERROR]
    assert not bad, f"{name}:\n" + "\n".join(f"  [{f.kind}] {f.message}" for f in bad)
