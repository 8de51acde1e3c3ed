"""The built book in a real browser: headless Debian Chromium, driven over the DevTools protocol.

Why a browser and not an HTML parser: "every image loads", "no horizontal overflow" and "the search page
works" are properties of the rendered page (CSS, the theme's JavaScript, Sphinx's search index), which
only a layout engine can tell. Chromium is driven through ``--remote-debugging-pipe`` (JSON messages on
file descriptors 3 and 4), so no driver package and no port are needed.

Two books are checked:

* a small book built here from two hand-made executed notebooks holding what used to break the pages
  (a wide table, a figure, absolute local paths, papermill's injected-parameters cell) — fast;
* the whole smoke book (slow; shared with the end-to-end test through the ``smoke_run`` fixture, or an
  existing run given as ``AUTORULE_BOOK_RUN_DIR=runs/smoke``). Screenshots of three of its pages are kept
  under ``<run dir>/book/screenshots/`` for the reviewer.

Chromium comes from Debian (``apt-get install chromium``; ``.ci/run`` installs it). Without it the test
is skipped, except in CI (``CI`` set), where a missing browser is a failure.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from autorule_lib.book.html import build_book
from autorule_lib.book.pages import absolute_paths
from autorule_lib.config import PROJECT_ROOT

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--mute-audio", "--remote-debugging-pipe", "about:blank"]
WIDTH, HEIGHT = 1280, 900


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does this)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


class Chromium:
    """A headless Chromium and one tab, spoken to with DevTools-protocol messages over a pipe."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="autorule-chromium-")  # a fresh --user-data-dir
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # the browser reads commands on fd 3 and writes answers on fd 4
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)  # out of the way of 3 and 4 first
            os.dup2(r, 3)
            os.dup2(w, 4)
            for fd in (3, 4):  # dup2 onto itself keeps close-on-exec
                os.set_inheritable(fd, True)

        # close_fds=False: Popen would close 3 and 4 after preexec_fn; os.pipe's own ends are not
        # inheritable and close at exec, the dup2 copies are and stay open
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"],
                                     close_fds=False, preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed its pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def open(self, path: Path, query: str = "", timeout: float = 60) -> None:
        self.events.clear()
        self.send("Page.navigate", session=True, url=path.resolve().as_uri() + query)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read_message(deadline))

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        return self.js(expression)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # the browser may already be gone; it is killed below anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Chromium(chromium_binary())
    yield b
    b.close()


# Page checks, measured by the browser ----------------------------------------------------------------

IMAGES = """Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))"""
# The main column: its content must fit (or scroll inside a table/output box), never widen the column.
OVERFLOW = """(() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  const root = document.documentElement;
  const box = col.getBoundingClientRect();
  const wide = [];
  for (const el of col.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= box.right + 1) continue;
    let clipped = false;  // inside a box that scrolls or clips horizontally: not an overflow of the column
    for (let p = el.parentElement; p && p !== col; p = p.parentElement) {
      const ox = getComputedStyle(p).overflowX;
      if ((ox === 'auto' || ox === 'scroll' || ox === 'hidden') && p.getBoundingClientRect().right <= box.right + 1) {
        clipped = true; break; }
    }
    if (!clipped) wide.push(el.tagName + '.' + el.className + ' right=' + Math.round(r.right));
  }
  return {column_scroll: col.scrollWidth, column_client: col.clientWidth, page_scroll: root.scrollWidth,
          viewport: window.innerWidth, column_right: Math.round(box.right), wide: wide.slice(0, 5)};
})()"""
SEARCH_HITS = """document.querySelectorAll('#search-results li, ul.search li').length"""


def check_page(browser: Chromium, page: Path, local_paths: list[str]) -> list[str]:
    """Problems of one rendered page: broken images, horizontal overflow, local paths in its text."""
    browser.open(page)
    problems = [f"image did not load: {i['src']}" for i in browser.js(IMAGES) if not i["ok"]]
    ov = browser.js(OVERFLOW)
    if ov["wide"] or ov["column_scroll"] > ov["column_client"] + 1 or ov["page_scroll"] > ov["viewport"] + 1:
        problems.append(f"horizontal overflow: {ov}")
    text = browser.js("document.body.innerText")
    leaked = absolute_paths(text) + [p for p in local_paths if p in text]
    if leaked:
        problems.append(f"absolute local paths in the text: {leaked[:5]}")
    return [f"{page.name}: {p}" for p in problems]


def check_book(browser: Chromium, html: Path, local_paths: list[str], pages: list[Path] | None = None) -> list[str]:
    pages = pages or sorted(html.glob("*.html")) + sorted(html.glob("chapters/*.html"))
    problems = []
    for page in pages:
        redirect = 'http-equiv="Refresh"' in page.read_text(errors="ignore")[:500]  # index.html -> intro.html
        if page.name not in {"search.html", "genindex.html"} and not redirect:
            problems += check_page(browser, page, local_paths)
    for page in sorted(html.rglob("*.html")) + sorted(html.rglob("*.ipynb")):  # raw files too (downloads)
        text = page.read_text(errors="ignore")
        leaked = [p for p in local_paths if p in text]
        if leaked:
            problems.append(f"{page.relative_to(html)} holds {leaked}")
    return problems


def search_works(browser: Chromium, html: Path, word: str) -> int:
    browser.open(html / "search.html", query=f"?q={word}")
    return browser.wait_for(SEARCH_HITS)


# A small book with what used to break the pages ------------------------------------------------------

def _executed_notebook(run_dir: Path, name: str, body: list) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = body
    path = run_dir / "notebooks" / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _png() -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def small_run(run_dir: Path) -> Path:
    """A run directory holding two executed notebooks in papermill's shape and a manifest."""
    run = str(run_dir.resolve())
    wide = "<table><tr>" + "".join(f"<th>a_rather_long_column_name_{i}</th>" for i in range(30)) + "</tr><tr>" + \
        "".join(f"<td>{run}/artifacts/07_evaluation/responses/{i}.jsonl</td>" for i in range(30)) + "</tr></table>"
    params = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = None', metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell(f'profile = "{run}/profile.yaml"\nrun_dir = "{run}"',
                                         metadata={"tags": ["injected-parameters"]})
    setup = nbformat.v4.new_code_cell("ctx = open_chapter('00_overview', profile, run_dir)",
                                      metadata={"tags": ["hide-input"]}, outputs=[nbformat.v4.new_output(
                                          "stream", name="stdout", text=f"chapter 00 | run dir {run}\n")])
    table = nbformat.v4.new_code_cell("table", outputs=[nbformat.v4.new_output(
        "execute_result", data={"text/html": wide, "text/plain": "table"}, execution_count=3)])
    figure = nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output(
        "display_data", data={"image/png": _png(), "text/plain": "<Figure>"})])
    long_line = nbformat.v4.new_code_cell("print(settings)", outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="settings: " + ", ".join(f"key_{i}=value_{i}" for i in range(60)) + "\n")])
    _executed_notebook(run_dir, "00_overview", [nbformat.v4.new_markdown_cell("# Overview\n\nSearchable zebra."),
                                                params, injected, setup, table, figure, long_line])
    _executed_notebook(run_dir, "09_results", [nbformat.v4.new_markdown_cell("# Results\n\nSome results."), params])
    manifest = {"profile": "smoke", "profile_hash": "abc", "seed": 0, "git_commit": "0" * 40, "python": "3.11",
                "packages": {}, "started_at": "t0", "ended_at": "t1",
                "stages": {"00_overview": {"status": "ok", "seconds": 1.0, "fingerprint": "f"}}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "profile.yaml").write_text("name: smoke\ndemonstration: true\n")
    return run_dir


def test_small_book_renders_cleanly(browser, tmp_path):
    run_dir = small_run(tmp_path / "run")
    html = build_book(run_dir).parent
    local = [str(run_dir.resolve()), str(PROJECT_ROOT)]
    assert check_book(browser, html, local) == []
    page = html / "chapters" / "00_overview.html"
    browser.open(page)
    text = browser.js("document.body.innerText")
    assert "Smoke run: how to read these numbers" in text  # the banner, on every page
    assert browser.js("document.querySelectorAll('.tag_remove-cell, .tag_parameters, .tag_injected-parameters')"
                      ".length") == 0, "the parameters cells are still on the page"
    assert "artifacts/07_evaluation/responses/0.jsonl" in text  # paths relative to the run directory
    assert "chapter 00 | run dir <run dir>" in text  # the setup cell's output is kept, its input hidden
    assert search_works(browser, html, "zebra") >= 1


def test_small_book_checks_fail_on_the_old_pages(browser, tmp_path, monkeypatch):
    """Without the page preparation (plain copies, as before) the same checks report the problems."""
    from autorule_lib.book import html as book
    from autorule_lib.book import pages as book_pages

    monkeypatch.setattr(book_pages, "prepare_notebook", lambda src, dst, run_dir: shutil.copy2(src, dst))
    monkeypatch.setattr(book_pages, "relativize_tree", lambda root, run_dir: [])
    run_dir = small_run(tmp_path / "run")
    html = book.build_book(run_dir).parent
    problems = check_book(browser, html, [str(run_dir.resolve())], [html / "chapters" / "00_overview.html"])
    assert any("absolute local paths" in p for p in problems), problems


# The whole smoke book --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_book_in_the_browser(browser, smoke_book):
    run_dir, html = smoke_book
    local = [str(run_dir.resolve()), str(PROJECT_ROOT)]
    assert check_book(browser, html, local) == []
    assert search_works(browser, html, "AutoRule") >= 1
    shots = run_dir / "book" / "screenshots"
    for name, page in (("intro", html / "intro.html"), ("grpo", html / "chapters" / "06_grpo.html"),
                       ("results", html / "chapters" / "09_results.html")):
        browser.open(page)
        if name == "results":  # the sanity-check table, at the end of the chapter
            browser.js("document.getElementById('sanity-checks')?.scrollIntoView()")
        assert browser.screenshot(shots / f"{name}.png").stat().st_size > 10_000


# Without a browser: the page preparation itself ------------------------------------------------------

def test_prepare_notebook_hides_parameters_and_relativizes_paths(tmp_path):
    from autorule_lib.book.pages import prepare_notebook

    run_dir = small_run(tmp_path / "run")
    out = tmp_path / "page.ipynb"
    prepare_notebook(run_dir / "notebooks" / "00_overview.ipynb", out, run_dir)
    nb = nbformat.read(out, as_version=4)
    plumbing = [c for c in nb.cells if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))]
    assert len(plumbing) == 2 and all("remove-cell" in c.metadata["tags"] for c in plumbing)
    assert 'profile = "profile.yaml"' in plumbing[1].source  # the injected path, relative to the run
    text = out.read_text()
    assert str(run_dir.resolve()) not in text and absolute_paths(text) == []
    assert "artifacts/07_evaluation/responses/0.jsonl" in text and "run dir <run dir>" in text


def test_absolute_path_finder():
    assert absolute_paths("see /home/alice/runs/x and /work/wt/runs") == ["/home/alice", "/work/wt"]
    assert absolute_paths("<project>/.venv/lib and ~/.cache and https://example.org/home/x") == []
    assert absolute_paths("artifacts/04_sft/model, a/b/c") == []
