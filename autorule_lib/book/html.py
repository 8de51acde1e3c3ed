"""Publish a run's executed notebooks as a jupyter-book (1.x, Sphinx) HTML site.

jupyter-book 2 downloads its site theme at build time, which fails offline; 1.x ships its theme.
Notebooks are executed by the runner (papermill), so the book never executes them again.

Only chapters the run's manifest records as finished under the current profile are published: the
notebooks folder may still hold chapters executed under an earlier profile or a failed attempt, and a
book mixing them would show numbers no single run produced. Missing chapters are named on the first
page. The method document (``book/method.md``) is part of every book, so the chapters' references to it
are links inside the book.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from . import pages as book_pages
from ..artifacts import read_json
from ..config import PROJECT_ROOT
from ..layout import RunLayout
from ..redaction import scrub_tree
from ..artifacts import MissingArtifactError  # kept apart from the imports above: merges
from .runner import discover_chapters

BOOK_DIR = PROJECT_ROOT / "book"
METHOD_DOC = "method.md"  # in BOOK_DIR; the chapters (notebooks/) link to it as ../book/method.md
EVAL_TEXTS = PROJECT_ROOT / "fixtures" / "authors_readme" / "evaluation_texts.md"  # linked from chapter 07


def build_book(run_dir: str | Path, profile=None) -> Path:
    """Build ``<run_dir>/book/_build/html`` from ``<run_dir>/notebooks``; returns the index page.

    ``profile`` (the current one) refuses a run made with other settings."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    name = profile.name if profile is not None else run_dir.name
    first = f"run `autorule run --profile {name}` first, then build the book"
    if not layout.manifest.exists():
        raise MissingArtifactError(f"no run in {run_dir} yet (no manifest.json): {first}")
    manifest = read_json(layout.manifest)
    if profile is not None and manifest.get("profile_hash") != profile.hash():
        raise MissingArtifactError(f"{run_dir} holds a run of profile {manifest.get('profile')!r} with settings "
                                   f"hash {manifest.get('profile_hash')}, but profile {name!r} now has hash "
                                   f"{profile.hash()}: {first}")
    executed, missing = publishable(run_dir, manifest, [s.name for s in discover_chapters()])
    if not executed:
        raise MissingArtifactError(f"no chapter of the run in {run_dir} has finished: {first}")
    failed = [f"{n} ({why})" for n, why in missing.items()]
    src = layout.book_src
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(BOOK_DIR, src, ignore=shutil.ignore_patterns("_build", "_toc.yml"))
    (src / "chapters").mkdir(exist_ok=True)
    for nb in executed:  # plumbing cells removed, paths relative to the run (book_pages)
        book_pages.prepare_notebook(nb, src / "chapters" / nb.name, run_dir)
    config = book_pages.book_config(yaml.safe_load((src / "_config.yml").read_text()), _is_smoke_run(run_dir))
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    toc = {"format": "jb-book", "root": "intro",
           "chapters": [{"file": f"chapters/{nb.stem}"} for nb in executed] + [{"file": "run_manifest"}]}
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    _add_texts(src, failed)
    (src / "run_manifest.md").write_text(_manifest_page(manifest, failed))
    out = layout.book
    # jupyter_book.cli.main has no __main__ guard; call its click entry point in a child process
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(src), "--path-output", str(out), "--all", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    scrub_tree(out)
    book_pages.relativize_tree(out / "_build", run_dir)
    index = out / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book reported success but {index} is missing")
    return index


def _is_smoke_run(run_dir: Path) -> bool:
    """``results.is_smoke`` on the run's frozen profile, read as plain YAML: the book of a finished run
    builds even where the profile's local data folders are gone."""
    frozen = RunLayout(run_dir).profile_file
    data = yaml.safe_load(frozen.read_text()) if frozen.exists() else {}
    return bool(data.get("demonstration"))


def _manifest_page(manifest: dict, failed: list[str]) -> str:
    rows = "\n".join(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | `{s.get('fingerprint', '')}` |"
                     for name, s in sorted(manifest["stages"].items()))
    warn = f"\n```{{warning}}\nChapters not finished successfully: {', '.join(failed)}\n```\n" if failed else ""
    pkgs = ", ".join(f"{k} {v}" for k, v in manifest["packages"].items())
    return (f"# Run manifest\n{warn}\n- profile: **{manifest['profile']}** (hash `{manifest['profile_hash']}`, "
            f"seed {manifest['seed']})\n- code: `{manifest['git_commit']}`\n- Python {manifest['python']}; {pkgs}\n"
            f"- started {manifest['started_at']}, ended {manifest['ended_at']}\n\n"
            f"| chapter | status | seconds | fingerprint |\n|---|---|---|---|\n{rows}\n")


def publishable(run_dir: Path, manifest: dict, chapter_names: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Executed notebooks to publish, in chapter order, and why each other chapter is left out."""
    records = manifest.get("stages", {})
    keep, missing = [], {}
    for name in dict.fromkeys(chapter_names + sorted(records)):
        rec, nb = records.get(name), RunLayout(run_dir).executed_notebook(name)
        if rec is None:
            missing[name] = "not run under this profile"
        elif rec.get("status") != "ok":
            missing[name] = str(rec.get("status"))
        elif not _readable(nb):
            missing[name] = "its executed notebook is missing or corrupt"
        else:
            keep.append(nb)
    return keep, missing


def _readable(nb: Path) -> bool:
    try:
        return isinstance(json.loads(nb.read_text()).get("cells"), list)
    except (OSError, ValueError):
        return False


def _add_texts(src: Path, failed: list[str]) -> None:
    """The method document and the authors' evaluation texts, at the paths the chapters link to, in the
    table of contents; and a note on the first page when chapters are missing."""
    (src / "book").mkdir(exist_ok=True)
    shutil.copy2(BOOK_DIR / METHOD_DOC, src / "book" / METHOD_DOC)
    texts = src / EVAL_TEXTS.relative_to(PROJECT_ROOT)
    texts.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(EVAL_TEXTS, texts)
    toc = yaml.safe_load((src / "_toc.yml").read_text())
    toc["chapters"] = ([{"file": "book/method"}] + toc["chapters"]
                       + [{"file": texts.relative_to(src).with_suffix("").as_posix()}])
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    if failed:
        intro = src / "intro.md"
        title, rest = intro.read_text().split("\n", 1)
        intro.write_text(f"{title}\n\n```{{warning}}\nThis book is incomplete. Not published, because the run did "
                         f"not finish them under this profile: {', '.join(failed)}.\n```\n{rest}")
