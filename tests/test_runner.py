"""The papermill runner: ordering, skipping unchanged stages, failure reporting, secret scrubbing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from pathlib import Path

from autorule_lib.profiles import load_profile
from autorule_lib.artifacts import CorruptFileError, WriteError, write_json
from autorule_lib.book.html import build_book, publishable
from autorule_lib.book.run_lock import LOCK_NAME, RunLock, RunLocked
from autorule_lib.book.runner import PrerequisitesMissing, RunDirError, _declares, _notebook_ok, NOTEBOOKS_DIR
from autorule_lib.book.runner import ChapterFailed, run_book, select_chapters, discover_chapters


def make_nb(path, body):
    nb = new_notebook()
    params = new_code_cell('profile = "smoke"\nrun_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fixtureTOKEN_123456")  # 01_second prints it (the scrubber must hide it)
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

    runs = lambda: (out / "second_runs.txt").read_text().count("run")  # noqa: E731
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
    with pytest.raises(ChapterFailed) as e:
        run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    msg = str(e.value)
    assert "00_first" in msg and "ValueError: the fixture is broken" in msg and "value = 41" in msg
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["00_first"]["status"] == "failed" and "01_second" not in manifest["stages"]


def test_select_chapters(nbdir):
    stages = discover_chapters(nbdir)
    assert [s.name for s in select_chapters(stages, ["01"])] == ["01_second"]
    assert [s.name for s in select_chapters(stages, ["second", "00_first"])] == ["00_first", "01_second"]
    with pytest.raises(ValueError, match="no such chapter"):
        select_chapters(stages, ["07"])


# ---------------------------------------------------------------- issue 16: isolated, locked, honest runs



def _profile(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_profile(path)


def test_custom_profile_does_not_inherit_the_run_dir(tmp_path):
    from autorule_lib.profiles import run_dir

    mine = _profile(tmp_path, "extends: smoke\nseed: 7\n")
    assert mine.name == "mine" and run_dir(mine).name == "mine"
    assert _profile(tmp_path, "extends: smoke\nname: exp1\n", "other.yaml").name == "exp1"
    assert load_profile("smoke").name == "smoke"


def test_run_dir_of_another_profile_is_refused_untouched(nbdir, tmp_path):
    out = tmp_path / "run"
    run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False, only=["00"])
    frozen, manifest = (out / "profile.yaml").read_text(), (out / "manifest.json").read_text()
    mine = _profile(tmp_path, "extends: smoke\nseed: 7\n")
    with pytest.raises(RunDirError, match="holds a run of profile 'smoke', not 'mine'"):
        run_book(mine, output_dir=out, notebooks_dir=nbdir, progress=False, only=["00"])
    assert (out / "profile.yaml").read_text() == frozen and (out / "manifest.json").read_text() == manifest


def test_book_publishes_only_chapters_finished_under_the_current_profile(tmp_path):
    out = tmp_path / "run"
    (out / "notebooks").mkdir(parents=True)
    for name in ("00_a", "01_b", "02_c"):  # all three executed at some point...
        nbformat.write(new_notebook(), out / "notebooks" / f"{name}.ipynb")
    manifest = {"profile": "smoke", "profile_hash": "h", "stages": {"00_a": {"status": "ok"},
                                                                     "01_b": {"status": "failed"}}}
    keep, missing = publishable(out, manifest, ["00_a", "01_b", "02_c"])  # ...but only 00 finished under it
    assert [p.name for p in keep] == ["00_a.ipynb"]
    assert missing == {"01_b": "failed", "02_c": "not run under this profile"}


def test_book_before_any_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_book(tmp_path / "nothing", profile=load_profile("smoke"))
    assert "no run in" in str(e.value) and "autorule run --profile smoke" in str(e.value)
    assert "any stage" not in str(e.value)


def test_book_refuses_a_run_of_other_settings(tmp_path):
    write_json(tmp_path / "manifest.json", {"profile": "smoke", "profile_hash": "0000", "stages": {}})
    with pytest.raises(FileNotFoundError, match="now has hash"):
        build_book(tmp_path, profile=load_profile("smoke"))


def test_force_reaches_the_chapters(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    nb = new_notebook()
    params = new_code_cell('profile = "smoke"\nrun_dir = None\nforce = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell("import os\nopen(os.path.join(run_dir, 'force.txt'), 'w').write(str(force))")]
    nbformat.write(nb, d / "00_train.ipynb")
    out = tmp_path / "run"
    run_book(load_profile("smoke"), output_dir=out, notebooks_dir=d, progress=False)
    assert (out / "force.txt").read_text() == "False"
    run_book(load_profile("smoke"), output_dir=out, notebooks_dir=d, progress=False, force=True)
    assert (out / "force.txt").read_text() == "True"


@pytest.mark.parametrize("chapter", ["04_sft", "05_reward_model", "06_grpo"])
def test_training_chapters_take_force(chapter):
    path = NOTEBOOKS_DIR / f"{chapter}.ipynb"
    assert _declares(path, "force")
    code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert "force=force" in code  # and hand it to the stage functions


def _writer_nbdir(tmp_path):
    """00 writes a 'model' (the content of model_src.txt), 01 reads it and counts its runs."""
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_train.ipynb", "import os, shutil\nos.makedirs(os.path.join(run_dir, 'models'), exist_ok=True)\n"
            f"shutil.copy({str(tmp_path / 'model_src.txt')!r}, os.path.join(run_dir, 'models', 'rm.txt'))")
    make_nb(d / "01_eval.ipynb", "import os\nwith open(os.path.join(run_dir, 'evals.txt'), 'a') as f:\n"
            "    f.write(open(os.path.join(run_dir, 'models', 'rm.txt')).read() + '\\n')")
    (tmp_path / "model_src.txt").write_text("rm v1")
    return d


def test_changed_upstream_output_reruns_downstream(tmp_path):
    d, out, profile = _writer_nbdir(tmp_path), tmp_path / "run", load_profile("smoke")
    run_book(profile, output_dir=out, notebooks_dir=d, progress=False)
    run_book(profile, output_dir=out, notebooks_dir=d, progress=False)
    assert (out / "evals.txt").read_text() == "rm v1\n"  # nothing changed: 01 skipped
    (tmp_path / "model_src.txt").write_text("rm v2")
    run_book(profile, output_dir=out, notebooks_dir=d, progress=False, only=["00"], force=True)  # retrain the RM
    m = run_book(profile, output_dir=out, notebooks_dir=d, progress=False)
    assert (out / "evals.txt").read_text() == "rm v1\nrm v2\n"  # the evaluation saw the new RM
    assert m["stages"]["00_train"]["outputs"] == ["models/rm.txt"]
    (out / "models" / "rm.txt").write_text("edited by hand")  # changed outside the runner: still noticed
    run_book(profile, output_dir=out, notebooks_dir=d, progress=False)
    assert (out / "evals.txt").read_text().endswith("edited by hand\n")


def test_edited_local_data_file_reruns(tmp_path, nbdir):
    data = tmp_path / "mydata"
    shutil.copytree(Path(load_profile("smoke").data.ultrafeedback_source), data)
    profile = _profile(tmp_path, "extends: smoke\ndata: {ultrafeedback_source: ./mydata}\n")
    out = tmp_path / "run"
    run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    runs = lambda: (out / "second_runs.txt").read_text().count("run")  # noqa: E731
    run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    assert runs() == 1
    first = sorted(p for p in data.rglob("*") if p.is_file())[0]
    first.write_bytes(first.read_bytes() + b"\n")
    run_book(profile, output_dir=out, notebooks_dir=nbdir, progress=False)
    assert runs() == 2


def test_copied_run_dir_resumes_without_rerunning(nbdir, tmp_path):
    out, copy = tmp_path / "run", tmp_path / "moved" / "run"
    run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    shutil.copytree(out, copy, copy_function=shutil.copy)  # new paths, new modification times
    m = run_book(load_profile("smoke"), output_dir=copy, notebooks_dir=nbdir, progress=False)
    assert (copy / "second_runs.txt").read_text().count("run") == 1
    assert all(not Path(s["executed_notebook"]).is_absolute() for s in m["stages"].values())


def test_bad_only_writes_nothing(nbdir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no such chapter"):
        run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False, only=["99"])
    assert not out.exists()


def test_all_missing_prerequisites_listed_at_once(nbdir, tmp_path):
    make_nb(nbdir / "02_third.ipynb", "x = 3")
    out = tmp_path / "run"
    with pytest.raises(PrerequisitesMissing) as e:
        run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False, only=["02"])
    assert "00_first (not run)" in str(e.value) and "01_second (not run)" in str(e.value)
    assert "--only 00,01" in str(e.value) and not out.exists()


def test_output_dir_that_is_a_file_is_one_clear_error(nbdir, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a folder"):
        run_book(load_profile("smoke"), output_dir=tmp_path / "afile" / "run", notebooks_dir=nbdir, progress=False)


def test_corrupt_manifest_names_the_file(nbdir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"profile": "smoke", "stages": {')
    with pytest.raises(RunDirError) as e:
        run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    assert str(out / "manifest.json") in str(e.value) and "corrupt" in str(e.value) and "move it aside" in str(e.value)
    assert "\n" not in str(e.value)


def test_read_json_names_a_corrupt_file(tmp_path):
    from autorule_lib.artifacts import read_json

    (tmp_path / "done.json").write_text('{"step": ')
    with pytest.raises(CorruptFileError, match=r"done\.json is corrupt .*re-run chapter 05 with --force"):
        read_json(tmp_path / "done.json", made_by="05")


def test_failed_manifest_write_keeps_the_chapter_error(nbdir, tmp_path, monkeypatch):
    import autorule_lib.book.runner as runner

    make_nb(nbdir / "00_first.ipynb", "raise ValueError('the chapter broke')")
    calls = []

    def full_disk(path, obj):
        calls.append(path)
        if len(calls) > 1:  # the "running" record goes in; the result does not
            raise WriteError(f"cannot write {path}: No space left on device")
        return write_json(path, obj)

    monkeypatch.setattr(runner, "write_json", full_disk)
    with pytest.raises(RunDirError) as e:
        run_book(load_profile("smoke"), output_dir=tmp_path / "run", notebooks_dir=nbdir, progress=False)
    msg = str(e.value)
    assert "manifest.json: No space left on device" in msg and "ValueError: the chapter broke" in msg
    # the next run knows that chapter did not finish (no run is alive to finish it)
    monkeypatch.setattr(runner, "write_json", write_json)
    make_nb(nbdir / "00_first.ipynb", "x = 1")
    m = run_book(load_profile("smoke"), output_dir=tmp_path / "run", notebooks_dir=nbdir, progress=False)
    assert m["stages"]["00_first"]["status"] == "ok"


def test_second_run_on_a_locked_dir_is_refused(nbdir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        with pytest.raises(RunLocked, match="in use by another run"):
            run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    assert not (out / "manifest.json").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(nbdir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    m = run_book(load_profile("smoke"), output_dir=out, notebooks_dir=nbdir, progress=False)
    assert m["stages"]["01_second"]["status"] == "ok" and not (out / LOCK_NAME).exists()
    assert f"took over the lock of a run that is gone (pid {dead.pid})" in capsys.readouterr().out


def test_lock_is_exclusive_between_processes(tmp_path):
    code = ("import sys, time\nfrom autorule_lib.book.run_lock import RunLock, RunLocked\n"
            "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLocked:\n    print('refused'); sys.exit(0)\n"
            "print('got it'); time.sleep(3)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["got it", "refused", "refused", "refused"]


DRIVER = ("import sys\nfrom pathlib import Path\nfrom autorule_lib.book import cli\n"
          "orig = cli.run_book\ncli.run_book = lambda *a, **k: orig(*a, notebooks_dir=Path(sys.argv[1]), **k)\n"
          "sys.exit(cli.main(sys.argv[2:]))\n")


def test_ctrl_c_is_one_line_and_marks_the_chapter_interrupted(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_slow.ipynb", "import time\ntime.sleep(120)")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(d), "run", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the kernel runs the cell
        nb = out / "notebooks" / ".partial.00_slow.ipynb"
        if nb.exists() and "time.sleep" in nb.read_text() and '"execution_count": 2' in nb.read_text():
            break
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted in chapter 00_slow; re-run to resume"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["00_slow"]["status"] == "interrupted"
    assert not (out / LOCK_NAME).exists()
    assert "without encryption" not in stdout + stderr  # the kernel's start-up notice stays out


def test_cli_run_refusals_are_one_line(nbdir, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-c", DRIVER, str(nbdir), "run", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    (tmp_path / "afile").write_text("x")
    for args, expected in [(["--output-dir", str(tmp_path / "afile")], "exists and is not a folder"),
                           (["--output-dir", str(tmp_path / "new"), "--only", "99"], "no such chapter")]:
        r = run(*args)
        assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "new").exists()


def test_notebook_ok_rejects_truncated_json(tmp_path):
    good, bad = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    nbformat.write(new_notebook(), good)
    bad.write_text(good.read_text()[:20])
    assert _notebook_ok(good) and not _notebook_ok(bad)


def test_lock_of_another_host_is_refused_unless_it_is_this_requeued_slurm_job(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-17", "since": "earlier", "slurm_job": "99"}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunLocked, match=f"host node-17 .*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "99")  # the same job, requeued onto another node
    lock = RunLock(tmp_path).acquire()
    assert lock.taken_over["host"] == "node-17"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_progress_bars_stay_out_of_executed_chapters(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_bars.ipynb", "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='loading shards'):\n    pass\n"
            "from autorule_lib.extraction.pipeline import extract_rules")
    out = tmp_path / "run"
    run_book(load_profile("smoke"), output_dir=out, notebooks_dir=d, progress=False)
    cells = json.loads((out / "notebooks" / "00_bars.ipynb").read_text())["cells"]
    shown = json.dumps([c.get("outputs", []) for c in cells])
    assert "loading shards" not in shown and "it/s" not in shown and "IProgress" not in shown
    assert "without encryption" in (out / "notebooks" / ".00_bars.kernel.log").read_text()  # kept, not shown


def test_stage_keeps_load_reports_out_of_the_chapter(monkeypatch, capsys):
    import transformers

    from autorule_lib.book.chapter import _quiet_progress_bars

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    before = transformers.utils.logging.get_verbosity()
    try:
        _quiet_progress_bars()
        transformers.utils.logging.get_logger("transformers.modeling_utils").warning("X LOAD REPORT score.weight MISSING")
        assert "LOAD REPORT" not in capsys.readouterr().err
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"  # training subprocesses inherit it
    finally:
        transformers.utils.logging.set_verbosity(before)


def test_extraction_bar_obeys_the_runners_tqdm_disable(tmp_path, monkeypatch, capsys):
    """Chapter 02 asks for a progress bar; under the runner (TQDM_DISABLE) the book does not get it."""
    from autorule_lib.extraction.pipeline import extract_rules

    smoke = load_profile("smoke")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rows = [{"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}],
             "score_chosen": 2.0, "score_rejected": 1.0, "prompt_id": "x"}]
    try:
        extract_rules(smoke, "uf", rows, tmp_path / "out", split="rm_train")
    except Exception:
        pass  # replay has no recording for this row; only the bar matters here
    assert "explain+extract" not in capsys.readouterr().err
