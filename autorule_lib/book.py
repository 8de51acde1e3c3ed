"""Publish a run's executed notebooks as a jupyter-book (1.x, Sphinx) HTML site.

jupyter-book 2 downloads its site theme at build time, which fails offline; 1.x ships its theme.
Notebooks are executed by the runner (papermill), so the book never executes them again.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from . import book_pages
from .artifacts import read_json
from .config import PROJECT_ROOT
from .redaction import scrub_tree

BOOK_DIR = PROJECT_ROOT / "book"


def build_book(run_dir: str | Path) -> Path:
    """Build ``<run_dir>/book/_build/html`` from ``<run_dir>/notebooks``; returns the index page."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "manifest.json", made_by="any stage (autorule run)")
    executed = sorted((run_dir / "notebooks").glob("*.ipynb"))
    if not executed:
        raise FileNotFoundError(f"no executed notebooks under {run_dir / 'notebooks'}; run `autorule run` first")
    failed = [n for n, s in manifest["stages"].items() if s.get("status") != "ok"]
    src = run_dir / "book_src"
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
    (src / "run_manifest.md").write_text(_manifest_page(manifest, failed))
    out = run_dir / "book"
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
    frozen = run_dir / "profile.yaml"
    data = yaml.safe_load(frozen.read_text()) if frozen.exists() else {}
    return data.get("name") == "smoke" or (data.get("models") or {}).get("policy") == "tiny"


def _manifest_page(manifest: dict, failed: list[str]) -> str:
    rows = "\n".join(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | `{s.get('fingerprint', '')}` |"
                     for name, s in sorted(manifest["stages"].items()))
    warn = f"\n```{{warning}}\nStages not finished successfully: {', '.join(failed)}\n```\n" if failed else ""
    pkgs = ", ".join(f"{k} {v}" for k, v in manifest["packages"].items())
    return (f"# Run manifest\n{warn}\n- profile: **{manifest['profile']}** (hash `{manifest['profile_hash']}`, "
            f"seed {manifest['seed']})\n- code: `{manifest['git_commit']}`\n- Python {manifest['python']}; {pkgs}\n"
            f"- started {manifest['started_at']}, ended {manifest['ended_at']}\n\n"
            f"| stage | status | seconds | fingerprint |\n|---|---|---|---|\n{rows}\n")
