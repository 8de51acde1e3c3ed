"""Publish a run's executed notebooks as a jupyter-book (1.x, Sphinx) HTML site.

jupyter-book 2 downloads its site theme at build time, which fails offline; 1.x ships its theme.
Notebooks are executed by the runner (papermill), so the book never executes them again.

Only chapters the run's manifest records as finished under the current profile are published: the
notebooks folder may still hold chapters executed under an earlier profile or a failed attempt, and
a book mixing them would present numbers no single run produced. Missing chapters are named on the
first page. The method document (``book/method.md``) is part of every book, so the chapters' references
to it are links inside the book.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .artifacts import MissingArtifactError, read_json
from .config import PROJECT_ROOT, Profile
from .redaction import scrub_tree

BOOK_DIR = PROJECT_ROOT / "book"
METHOD_DOC = "method.md"  # inside BOOK_DIR; chapters link to it as ../book/method.md


def publishable(run_dir: Path, manifest: dict, stage_names: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Executed notebooks to publish, in chapter order, and why each other chapter is left out."""
    records = manifest.get("stages", {})
    names = list(dict.fromkeys(stage_names + sorted(records)))
    keep, missing = [], {}
    for name in names:
        rec = records.get(name)
        nb = run_dir / "notebooks" / f"{name}.ipynb"
        if rec is None:
            missing[name] = "not run under this profile"
        elif rec.get("status") != "ok":
            missing[name] = f"{rec.get('status')}"
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


def build_book(run_dir: str | Path, profile: Profile | None = None) -> Path:
    """Build ``<run_dir>/book/_build/html`` from ``<run_dir>/notebooks``; returns the index page."""
    from .runner import discover_stages

    run_dir = Path(run_dir)
    name = profile.name if profile is not None else run_dir.name
    if not (run_dir / "manifest.json").exists():
        raise MissingArtifactError(f"no run in {run_dir} yet (no manifest.json): run "
                                   f"`autorule run --profile {name}` first, then build the book")
    manifest = read_json(run_dir / "manifest.json")
    if profile is not None and manifest.get("profile_hash") != profile.hash():
        raise MissingArtifactError(
            f"{run_dir} holds a run of profile {manifest.get('profile')!r} with settings hash "
            f"{manifest.get('profile_hash')}, but profile {profile.name!r} now has hash {profile.hash()}: "
            f"run `autorule run --profile {name}` first, then build the book")
    executed, missing = publishable(run_dir, manifest, [s.name for s in discover_stages()])
    if not executed:
        raise MissingArtifactError(f"no chapter of the run in {run_dir} has finished: run "
                                   f"`autorule run --profile {name}` first, then build the book")
    src = run_dir / "book_src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(BOOK_DIR, src, ignore=shutil.ignore_patterns("_build", "_toc.yml", METHOD_DOC))
    (src / "book").mkdir()
    shutil.copy2(BOOK_DIR / METHOD_DOC, src / "book" / METHOD_DOC)  # where the chapters' links point
    (src / "chapters").mkdir(exist_ok=True)
    for nb in executed:
        shutil.copy2(nb, src / "chapters" / nb.name)
    toc = {"format": "jb-book", "root": "intro",
           "chapters": [{"file": "book/method"}] + [{"file": f"chapters/{nb.stem}"} for nb in executed]
           + [{"file": "run_manifest"}]}
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (src / "run_manifest.md").write_text(_manifest_page(manifest, missing))
    if missing:
        intro = src / "intro.md"
        title, rest = intro.read_text().split("\n", 1)
        intro.write_text(f"{title}\n{_missing_note(missing)}{rest}")
    out = run_dir / "book"
    # jupyter_book.cli.main has no __main__ guard; call its click entry point in a child process
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(src), "--path-output", str(out), "--all", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    scrub_tree(out)
    index = out / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book reported success but {index} is missing")
    return index


def _missing_note(missing: dict[str, str]) -> str:
    items = "\n".join(f"- {name}: {why}" for name, why in missing.items())
    return (f"\n```{{warning}}\nThis book is incomplete: these chapters are not published because the run "
            f"did not finish them under this profile.\n\n{items}\n```\n")


def _manifest_page(manifest: dict, missing: dict[str, str]) -> str:
    rows = "\n".join(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | `{s.get('fingerprint', '')}` |"
                     for name, s in sorted(manifest["stages"].items()))
    warn = _missing_note(missing) if missing else ""
    pkgs = ", ".join(f"{k} {v}" for k, v in manifest["packages"].items())
    return (f"# Run manifest\n{warn}\n- profile: **{manifest['profile']}** (hash `{manifest['profile_hash']}`, "
            f"seed {manifest['seed']})\n- code: `{manifest['git_commit']}`\n- Python {manifest['python']}; {pkgs}\n"
            f"- started {manifest['started_at']}, ended {manifest['ended_at']}\n\n"
            f"| stage | status | seconds | fingerprint |\n|---|---|---|---|\n{rows}\n")
