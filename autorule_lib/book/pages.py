"""Turn a run's executed notebooks into pages a reader wants: no plumbing, no local paths, a smoke banner.

Why a separate step: papermill writes notebooks for the machine (an injected-parameters cell holding
this machine's absolute paths, every print of a model folder spelt out in full); the book is for a
reader on another machine. Before jupyter-book renders them, the copies are rewritten:

* the ``parameters`` and papermill's ``injected-parameters`` cells are removed from the page
  (tag ``remove-cell``); setup cells carry ``hide-input`` in the notebooks themselves, so their
  outputs stay visible and the code is one click away;
* every absolute path of the run directory becomes a path relative to it (``artifacts/04_sft/model``),
  the project folder becomes ``<project>`` and the home folder ``~``, in sources and outputs alike,
  so neither the HTML nor the downloadable ``.ipynb`` tells where the book was run;
* on a smoke run every page gets a banner that says how to read smoke numbers.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from ..config import PROJECT_ROOT

HIDDEN_CELL_TAGS = {"parameters": "remove-cell", "injected-parameters": "remove-cell"}
TEXT_SUFFIXES = {".html", ".js", ".ipynb", ".txt", ".md", ".json"}
# Roots under which a local absolute path would give away the machine that built the book.
LOCAL_ROOTS = ("work", "home", "root", "tmp", "mnt", "srv", "opt", "var", "usr", "scratch", "data", "Users")
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:" + "|".join(LOCAL_ROOTS) + r")/[\w.+-]+")

SMOKE_BANNER = (
    "<b>Smoke run: how to read these numbers.</b> Tiny local models and fixture data: a number shows that the "
    "pipeline ran and which way each reward moved its model, not how well AutoRule works. The results chapter "
    "ends with this run's sanity checks.")


def replacements(run_dir: Path) -> list[tuple[str, str]]:
    """(absolute prefix, replacement), longest first, so the run directory wins over the project folder."""
    run = str(Path(run_dir).resolve())
    pairs = [(run + "/", ""), (run, "<run dir>"), (str(PROJECT_ROOT) + "/", "<project>/"),
             (str(PROJECT_ROOT), "<project>"), (str(Path.home()) + "/", "~/")]
    if str(run_dir) != run:  # a run directory given through a symlink or as a relative path
        pairs[:0] = [(str(Path(run_dir).absolute()) + "/", ""), (str(Path(run_dir).absolute()), "<run dir>")]
    return sorted({p for p in pairs if len(p[0]) > 1}, key=lambda p: -len(p[0]))


def relativize(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def absolute_paths(text: str) -> list[str]:
    """Local absolute paths left in a text (what the browser test and the build check look for)."""
    return sorted(set(ABSOLUTE_PATH.findall(text)))


def prepare_notebook(src: Path, dst: Path, run_dir: Path) -> None:
    """Copy one executed notebook for the book: plumbing cells removed, paths relative to the run."""
    nb = nbformat.read(src, as_version=4)
    pairs = replacements(run_dir)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        for tag, hide in HIDDEN_CELL_TAGS.items():
            if tag in tags and hide not in tags:
                tags.append(hide)
        cell.source = relativize(cell.source, pairs)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = relativize(out["text"], pairs)
            for mime, value in out.get("data", {}).items():
                if isinstance(value, str) and not mime.startswith("image/"):  # images are base64
                    out["data"][mime] = relativize(value, pairs)
            if "traceback" in out:
                out["traceback"] = [relativize(line, pairs) for line in out["traceback"]]
    nbformat.write(nb, dst)


def relativize_tree(root: Path, run_dir: Path) -> list[str]:
    """Safety net after the build: rewrite what Sphinx itself wrote (search index, page sources)."""
    pairs, changed = replacements(run_dir), []
    for path in Path(root).rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            new = relativize(text, pairs)
            if new != text:
                path.write_text(new, encoding="utf-8")
                changed.append(str(path.relative_to(root)))
    return changed


def book_config(config: dict, smoke: bool) -> dict:
    """The book's ``_config.yml`` for this run: the smoke banner on every page of a smoke run."""
    config = dict(config)
    if smoke:
        config["html"] = {**config.get("html", {}), "announcement": SMOKE_BANNER}
    return config
