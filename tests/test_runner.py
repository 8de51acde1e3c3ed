"""The papermill runner: ordering, skipping unchanged stages, failure reporting, secret scrubbing."""
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from autorule_lib.config import load_profile
from autorule_lib.runner import StageFailed, run_book, select_stages, discover_stages


def make_nb(path, body):
    nb = new_notebook()
    params = new_code_cell('profile = "smoke"\nrun_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_first.ipynb", "from pathlib import Path\nPath(run_dir, 'first.txt').write_text(profile)")
    make_nb(d / "01_second.ipynb", "import os\nprint(os.environ['HF_TOKEN'])\n"
                                   "with open(os.path.join(run_dir, 'second_runs.txt'), 'a') as f: f.write('run\\n')")
    return d


def test_runs_in_order_skips_unchanged_and_reruns_downstream(nbdir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretVALUE_abcdef")
    profile, out = load_profile("smoke"), tmp_path / "run"
    m = run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    assert [m["stages"][s]["status"] for s in ("00_first", "01_second")] == ["ok", "ok"]
    assert (out / "first.txt").read_text() == str(out / "profile.yaml")  # the frozen profile is injected
    executed = (out / "notebooks/01_second.ipynb").read_text()
    assert "hf_secretVALUE_abcdef" not in executed and "[REDACTED]" in executed
    assert m["stages"]["01_second"]["redacted"]
    fp = m["stages"]["01_second"]["fingerprint"]

    runs = lambda: (out / "second_runs.txt").read_text().count("run")
    assert runs() == 1
    run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    assert runs() == 1  # unchanged: skipped

    make_nb(nbdir / "00_first.ipynb", "x = 1")  # an upstream change re-runs everything after it
    m3 = run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    assert m3["stages"]["01_second"]["fingerprint"] != fp and runs() == 2

    run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False, force=True, only=["01"])
    assert runs() == 3


def test_failed_stage_stops_chain_and_names_cell(nbdir, tmp_path):
    make_nb(nbdir / "00_first.ipynb", "value = 41\nraise ValueError('the fixture is broken')")
    out = tmp_path / "run"
    with pytest.raises(StageFailed) as e:
        run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    msg = str(e.value)
    assert "00_first" in msg and "ValueError: the fixture is broken" in msg and "value = 41" in msg
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["00_first"]["status"] == "failed" and "01_second" not in manifest["stages"]


def test_select_stages(nbdir):
    stages = discover_stages(nbdir)
    assert [s.name for s in select_stages(stages, ["01"])] == ["01_second"]
    assert [s.name for s in select_stages(stages, ["second", "00_first"])] == ["00_first", "01_second"]
    with pytest.raises(ValueError, match="no such stage"):
        select_stages(stages, ["07"])
