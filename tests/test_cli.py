"""The command line: refusals that protect money and GPU time, defaults that work on the smoke setup,
and texts that point inside the repository."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autorule_lib.book.cli import build_parser, main
from autorule_lib.config import PROJECT_ROOT
from autorule_lib.profiles import load_profile
from conftest import with_smoke_models

CLI = [sys.executable, "-m", "autorule_lib.book.cli"]


@pytest.mark.parametrize("llm", ["bedrock", "openai", "local"])
def test_spending_extraction_requires_a_named_profile(llm, tmp_path, capsys):
    rc = main(["extract-rules", "--dataset_type", "uf", "--output_dir", str(tmp_path / "rules"), "--llm", llm])
    err = capsys.readouterr().err
    assert rc == 2 and "--profile" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rules").exists()  # nothing started, nothing written


def test_extract_rules_on_the_smoke_profile_works_with_its_defaults(tmp_path, models_dir):
    """Replayed responses answer chapter 02's examples: the command reads chapter 01's prepared sets."""
    from autorule_lib.profiles import run_dir
    from autorule_lib.data.preparation import prepare_data

    prof_file = tmp_path / "smoke.yaml"
    prof_file.write_text(f"extends: smoke\nname: smoke\nruns_dir: {tmp_path / 'runs'}\n")
    profile = load_profile(prof_file)
    rdir = run_dir(profile)
    out = tmp_path / "rules"
    before = subprocess.run(CLI + ["extract-rules", "--dataset_type", "uf", "--output_dir", str(out), "--profile",
                                   str(prof_file)], capture_output=True, text=True, timeout=300)
    assert before.returncode == 2 and "run chapter 01 first" in before.stderr  # says what is missing
    with_smoke_models(models_dir, rdir)
    prepare_data(profile, "ultrafeedback", profile.data.ultrafeedback_source,
                 rdir / "artifacts" / "01_data_preparation" / "ultrafeedback", models_dir=rdir / "models")
    r = subprocess.run(CLI + ["extract-rules", "--dataset_type", "uf", "--output_dir", str(out), "--profile",
                              str(prof_file)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    n = profile.extraction.uf_num_examples
    assert report["examples"] == n and report["examples_ok"] == n  # no `no_recording` failures
    assert f"from {n}/{n} examples" in r.stdout


def test_book_before_any_run_is_one_clear_line(tmp_path):
    r = subprocess.run(CLI + ["book", "--output-dir", str(tmp_path / "none")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no run in" in r.stderr and "autorule run --profile smoke" in r.stderr and "any stage" not in r.stderr


def _help_texts(parser) -> str:
    out = [parser.format_help()]
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "add_parser") else ():
            out.append(_help_texts(sub))
    return "\n".join(out)


OUTSIDE_REFERENCES = re.compile(r"METHOD\.md|SEED_EVAL|\b[Tt]he seed\b")


def test_texts_readers_see_point_inside_the_repository():
    """CLI help, the chapters' prose and the SLURM estimates cite the in-repo method document."""
    assert not OUTSIDE_REFERENCES.findall(_help_texts(build_parser()))
    for path in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            assert not OUTSIDE_REFERENCES.search(cell.source), (path.name, cell.source[:200])
    assert not OUTSIDE_REFERENCES.search((PROJECT_ROOT / "autorule_lib" / "cluster" / "estimates.py").read_text())
    for link in re.findall(r"\(\.\./([^)#]+)", "".join(
            c.source for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb")
            for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown")):
        assert (PROJECT_ROOT / link).is_file(), link  # every relative link resolves inside the repository


def test_no_test_reads_outside_the_repository():
    for path in sorted((PROJECT_ROOT / "tests").glob("*.py")):
        text = path.read_text()
        if path.name != Path(__file__).name:  # this file names the patterns it looks for
            assert not re.search(r"parents\[[2-9]\]|/work/shared|\"shared\"", text), path.name
