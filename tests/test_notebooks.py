"""Notebook hygiene and the end-to-end papermill run of the book on the smoke profile."""
import json
import subprocess
import sys

import pytest

from autorule_lib.book.runner import NOTEBOOKS_DIR, discover_chapters

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not [c for c in code if c.get("outputs") or c.get("execution_count")], "outputs are committed"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    src = "".join(params[0]["source"]).splitlines()
    assert 'profile = "smoke"' in src and "run_dir = None" in src


def test_chapters_are_numbered_in_order():
    names = [s.name for s in discover_chapters()]
    assert names[:2] == ["00_overview", "01_data_preparation"] and names == sorted(names)


@pytest.mark.slow
def test_smoke_book_end_to_end_without_leaking_secrets(smoke_run):
    from conftest import FAKE_SECRETS

    tmp_path, env, run = smoke_run  # the whole book, run once per session (conftest)
    autorule = [sys.executable, "-m", "autorule_lib.book.cli"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {s.name for s in discover_chapters()} <= set(manifest["stages"])
    assert all(s["status"] == "ok" for s in manifest["stages"].values())
    report = json.loads((tmp_path / "artifacts/01_data_preparation/ultrafeedback/report.json").read_text())
    assert set(report) == {"train_prefs", "test_prefs", "train_sft", "test_sft"}
    for split in report.values():  # the fixtures hold rows for every drop reason
        assert all(split["dropped"][r] > 0 for r in ("too_long", "score_not_higher", "contains_confidence"))

    again = subprocess.run(autorule + ["run", "--profile", "smoke", "--output-dir", str(tmp_path), "--only", "01"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "unchanged, skipped" in again.stdout

    book = subprocess.run(autorule + ["book", "--profile", "smoke", "--output-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert book.returncode == 0, book.stdout[-3000:] + book.stderr[-3000:]
    html = tmp_path / "book/_build/html"
    overview = (html / "chapters/00_overview.html").read_text()
    data_page = (html / "chapters/01_data_preparation.html").read_text()
    assert "Where the paper and the released code disagree" in overview and "<table" in overview
    assert "contains_confidence" in data_page and "<table" in data_page and "<img" in data_page
    assert (html / "run_manifest.html").exists()

    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in {".ipynb", ".json", ".html", ".md", ".yaml", ".txt", ".js", ".tsv"}:
            text = path.read_text(errors="ignore")
            leaked = [k for k, v in FAKE_SECRETS.items() if v in text]
            assert not leaked, f"{path} contains {leaked}"
