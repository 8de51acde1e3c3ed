"""Execute the numbered notebooks of the book in order with papermill, with a run manifest.

A chapter is skipped when its fingerprint matches a previous successful run, unless forced. The
fingerprint chains: a chapter's notebook code, the profile hash, the library code, the contents of the
profile's local data files, and what the chapter before it produced (by content, see ``run_identity``),
so a retrained model or an edited fixture re-runs everything that depends on it.

A run directory belongs to one profile and one run at a time (``run_lock``). Arguments are checked
before anything is written; Ctrl-C, a failed write or a chapter's error each leave the manifest saying
what happened to which chapter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..artifacts import CorruptFileError, git_commit, now, package_versions, read_json, write_json
from ..config import PROJECT_ROOT, Profile
from ..layout import RunLayout, chapter_names
from ..profiles import dump_profile, run_dir as default_run_dir
from ..redaction import scrub_tree
from .run_identity import FileHashes, local_data_digest, snapshot, written_since
from .run_lock import RunLock

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
LIBRARY_DIR = Path(__file__).resolve().parents[1]
CHAPTER_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
KERNEL_NAME = "autorule"


class ChapterFailed(RuntimeError):
    """A notebook raised; the message shows the chapter, the cell and the error."""


@dataclass
class Chapter:
    name: str
    path: Path

    @property
    def number(self) -> str:
        return self.name[:2]


def discover_chapters(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Chapter]:
    return [Chapter(p.stem, p) for p in sorted(notebooks_dir.glob("*.ipynb")) if CHAPTER_NAME.match(p.name)]


def select_chapters(chapters: list[Chapter], only: list[str] | None) -> list[Chapter]:
    """The chapters ``only`` selects (``layout.chapter_names``'s rule), in book order."""
    names = chapter_names(only, [c.name for c in chapters])
    return [c for c in sorted(chapters, key=lambda c: c.name) if c.name in names]


def _code_hash(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    return hashlib.sha256(json.dumps([(c["cell_type"], "".join(c["source"])) for c in cells]).encode()).hexdigest()


def library_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(LIBRARY_DIR.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".txt", ".md", ".yaml", ".json") and "__pycache__" not in p.parts:
            h.update(p.relative_to(LIBRARY_DIR).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def fingerprints(chapters: list[Chapter], profile: Profile, run_dir: Path | None = None,
                 records: dict | None = None, hashes: FileHashes | None = None) -> dict[str, str]:
    """Chained input hashes: a change to a chapter, or to what an earlier chapter produced, re-runs it and
    everything after it. ``records`` (the manifest's "stages") says which files each chapter wrote."""
    records = records or {}
    if run_dir is not None and hashes is None:
        hashes = FileHashes(run_dir)
    data = local_data_digest(profile, hashes or FileHashes(Path(os.devnull)))
    out, prev, lib, upstream = {}, "", library_hash(), ""
    for s in chapters:
        prev = hashlib.sha256(f"{prev}|{_code_hash(s.path)}|{profile.hash()}|{lib}|{data}|{upstream}"
                              .encode()).hexdigest()[:16]
        out[s.name] = prev
        written = records.get(s.name, {}).get("outputs") or []
        upstream = hashes.digest(run_dir, written) if (run_dir is not None and written) else ""
    return out


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a chapter; the manifest marks it interrupted."""

    def __init__(self, chapter: str):
        super().__init__(f"interrupted in chapter {chapter}; re-run to resume")
        self.chapter = chapter


class RunDirError(RuntimeError):
    """The run directory cannot be used (another profile's run, not a folder, not writable, corrupt)."""


class PrerequisitesMissing(RuntimeError):
    """Earlier chapters the selected ones read from have not finished under this profile."""


def _kernel_manager_class(log_path: Path):
    """A kernel manager that sends the kernel process's own output to ``log_path``.

    What a cell prints reaches the notebook over the kernel's channels; the process's stdout/stderr
    only carry the kernel's own log (its start-up notice, tracebacks while it is interrupted or shut
    down), which would otherwise land in the console between the runner's lines. JupyterLab kernels
    are untouched."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw):
            cmd, kw = await super()._async_pre_start_kernel(**kw)
            log = open(log_path, "ab")  # the kernel process holds its own copy of the descriptor
            kw["stdout"] = kw["stderr"] = log
            # progress bars (datasets, extraction, trainers) are for a person watching, not for the book
            # (tqdm.auto's "IProgress not found" comes at import, before a chapter can filter it)
            kw["env"] = {**(kw.get("env") or os.environ), "TQDM_DISABLE": "1",
                         "PYTHONWARNINGS": "ignore:IProgress not found"}
            self._autorule_log = log
            return cmd, kw

    return LoggedKernelManager


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def _describe_failure(chapter: Chapter, err: Exception, executed: Path) -> str:
    cell = getattr(err, "cell_index", None)
    source = (getattr(err, "source", "") or "").strip().splitlines()
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f" in cell {cell}" if cell is not None else ""
    lines = [f"chapter {chapter.name} failed{where}: {ename}: {evalue}"]
    if source:
        lines += ["  cell source:"] + [f"    {line}" for line in source[:15]]
    lines.append(f"  executed notebook (with the full traceback): {executed}")
    return "\n".join(lines)


def _owner(rdir: Path) -> str | None:
    """Name of the profile whose run the directory holds (manifest first, else its frozen profile)."""
    manifest = RunLayout(rdir).manifest
    if manifest.exists():
        return read_json(manifest).get("profile")
    frozen = RunLayout(rdir).profile_file
    if frozen.exists():
        try:
            return (yaml.safe_load(frozen.read_text()) or {}).get("name")
        except yaml.YAMLError:
            raise RunDirError(f"{frozen} is corrupt; move it aside and re-run") from None
    return None


def check_run_dir(rdir: Path, profile: Profile) -> None:
    """Refuse a directory that cannot hold this profile's run, before anything is written there."""
    for p in [rdir, *rdir.parents]:
        if p.exists():
            if not p.is_dir():
                raise RunDirError(f"run directory {rdir}: {p} exists and is not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunDirError(f"run directory {rdir}: {p} is not writable")
            break
    if rdir.is_dir():
        try:
            owner = _owner(rdir)
        except CorruptFileError as e:
            raise RunDirError(f"{e} (the run record; moving it aside re-runs every chapter)") from None
        if owner is not None and owner != profile.name:
            raise RunDirError(f"{rdir} holds a run of profile {owner!r}, not {profile.name!r}: pass another "
                              f"--output-dir, or move that run aside")


def _notebook_ok(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("cells") is not None)
    except (OSError, ValueError):
        return False


def missing_prerequisites(chapters: list[Chapter], selected: list[Chapter], records: dict) -> list[str]:
    """Every earlier chapter that is neither selected nor finished, for all selected chapters at once."""
    chosen = {s.name for s in selected}
    last = max(chapters.index(s) for s in selected)
    return [f"{s.name} ({records.get(s.name, {}).get('status', 'not run')})" for s in chapters[:last]
            if s.name not in chosen and records.get(s.name, {}).get("status") != "ok"]


def _on_signal(signum, frame):
    """Ctrl-C, SLURM preemption and `kill` end the run the same way: one line, manifest marked. The
    kernel is shut down while the interrupt unwinds; what papermill, nbclient and asyncio log about
    that ("kernel died", unretrieved task errors) is a consequence, not news, so it is silenced."""
    for name in ("papermill", "nbclient", "asyncio", "traitlets"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    raise KeyboardInterrupt


def run_book(profile: Profile, only: list[str] | None = None, output_dir: str | Path | None = None,
             force: bool = False, progress: bool = True, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """Run the selected chapters; returns the manifest. Raises ChapterFailed on the first failing chapter,
    RunInterrupted on Ctrl-C/SIGTERM, RunDirError/RunLocked/PrerequisitesMissing before running anything."""
    chapters = discover_chapters(notebooks_dir)
    selected = select_chapters(chapters, only)  # bad --only: nothing written yet
    rdir = default_run_dir(profile, output_dir)
    check_run_dir(rdir, profile)
    manifest_path = RunLayout(rdir).manifest
    old = read_json(manifest_path) if manifest_path.exists() else {}
    records = old.get("stages", {}) if old.get("profile_hash") == profile.hash() else {}
    if only:
        missing = missing_prerequisites(chapters, selected, records)
        if missing:
            names = ",".join(m[:2] for m in missing)
            raise PrerequisitesMissing(f"earlier chapters have not finished under profile {profile.name!r}: "
                                       f"{', '.join(missing)}; run them first (autorule run --only {names}) "
                                       f"or run without --only")
    try:
        rdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {rdir}: {e.strerror}") from None
    with RunLock(rdir) as lock:
        if lock.taken_over is not None:
            print(f"note: took over the lock of a run that is gone (pid {lock.taken_over.get('pid')})", flush=True)
        return _run_locked(profile, chapters, selected, rdir, force, progress, notebooks_dir)


def _run_locked(profile, chapters, selected, rdir, force, progress, notebooks_dir) -> dict:
    import papermill as pm

    layout = RunLayout(rdir)
    manifest_path = layout.manifest  # read again under the lock: another run may just have ended
    old = read_json(manifest_path) if manifest_path.exists() else {}
    records = old.get("stages", {}) if old.get("profile_hash") == profile.hash() else {}
    for name, rec in records.items():  # left "running" by a run that died: it is no longer running
        if rec.get("status") == "running":
            rec.update(status="interrupted", error="the run ended without recording this chapter's result")
    frozen = dump_profile(profile, layout.profile_file)
    manifest = {
        "profile": profile.name, "profile_file": profile.source_file, "profile_hash": profile.hash(),
        "seed": profile.seed, "git_commit": git_commit(), "packages": package_versions(),
        "python": sys.version.split()[0], "started_at": now(), "ended_at": None, "stages": records,
    }
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONHASHSEED": str(profile.seed)}
    os.environ.update(env)  # the kernel inherits this process's environment
    hashes = FileHashes(rdir)
    previous = ({sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                if _main_thread() else {})
    try:
        for i, chapter in enumerate(selected, 1):
            fp = fingerprints(chapters, profile, rdir, manifest["stages"], hashes)[chapter.name]
            hashes.save()
            executed = layout.executed_notebook(chapter.name)
            prev = manifest["stages"].get(chapter.name, {})
            if not force and prev.get("status") == "ok" and prev.get("fingerprint") == fp:
                if _notebook_ok(executed):
                    print(f"[{i}/{len(selected)}] {chapter.name}: unchanged, skipped (use --force to re-run)",
                          flush=True)
                    continue
                print(f"[{i}/{len(selected)}] {chapter.name}: its executed notebook is missing or corrupt; re-running",
                      flush=True)
            why = "" if prev.get("status") != "ok" or force else " (inputs changed)"
            print(f"[{i}/{len(selected)}] {chapter.name}: running{why}", flush=True)
            _run_chapter(pm, chapter, executed, fp, frozen, rdir, manifest, manifest_path, force, progress,
                       notebooks_dir, prev)
            print(f"    done in {manifest['stages'][chapter.name]['seconds']} s", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return manifest


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_chapter(pm, chapter, executed, fp, frozen, rdir, manifest, manifest_path, force, progress, notebooks_dir,
               prev) -> None:
    record = {"status": "running", "fingerprint": fp, "started_at": now(),
              "executed_notebook": executed.relative_to(rdir).as_posix()}
    manifest["stages"][chapter.name] = record
    _write_manifest(manifest_path, manifest)
    before = snapshot(rdir)
    t0 = time.perf_counter()
    # executed into a hidden file and moved into place at the end: a crash or a full disk never leaves
    # a truncated notebook where the book looks for it
    partial = executed.parent / f".partial.{executed.name}"
    interrupted = None
    try:
        executed.parent.mkdir(parents=True, exist_ok=True)
        pm.execute_notebook(str(chapter.path), str(partial), kernel_name=_kernel_name(), cwd=str(notebooks_dir),
                            parameters=_parameters(chapter.path, frozen, rdir, force), progress_bar=progress,
                            request_save_on_cell_execute=True, language="python",
                            kernel_manager_class=_kernel_manager_class(executed.parent / f".{chapter.name}.kernel.log"))
        record["status"] = "ok"
    except KeyboardInterrupt:
        interrupted = RunInterrupted(chapter.name)
        record.update(status="interrupted", error=str(interrupted))
    except Exception as err:  # papermill wraps the kernel's error; keep it for the manifest
        if getattr(err, "ename", "") == "KeyboardInterrupt":  # the kernel got the Ctrl-C first
            interrupted = RunInterrupted(chapter.name)
            record.update(status="interrupted", error=str(interrupted))
        else:
            record.update(status="failed", error=_describe_failure(chapter, err, executed))
    finally:
        if _notebook_ok(partial):
            os.replace(partial, executed)
        elif partial.exists():
            record["notebook_error"] = f"the executed notebook could not be written completely ({partial})"
        record.update(ended_at=now(), seconds=round(time.perf_counter() - t0, 1))
        try:
            after = snapshot(rdir)
            kept = [r for r in prev.get("outputs", []) if r in after]  # e.g. a kept model the re-run did not rewrite
            record["outputs"] = sorted(set(written_since(before, after)) | set(kept))
            redacted = scrub_tree(rdir)
        except OSError as e:
            redacted = None
            record.setdefault("error", f"could not read back the run directory: {e}")
        if redacted:
            record["redacted"] = redacted
            print(f"  warning: secret values found and redacted in {len(redacted)} file(s)", file=sys.stderr)
        manifest["ended_at"] = now()
        _write_manifest(manifest_path, manifest, chapter_error=record.get("error"))
    if interrupted is not None:
        raise interrupted
    if record["status"] == "failed":
        raise ChapterFailed(record["error"])


def _write_manifest(path: Path, manifest: dict, chapter_error: str | None = None) -> None:
    """A failed manifest write must not hide the chapter's own error: both go into one message."""
    try:
        write_json(path, manifest)
    except OSError as e:
        also = f"; the chapter's own error: {chapter_error.splitlines()[0]}" if chapter_error else ""
        raise RunDirError(f"{e}: the run record is not updated{also}") from None


def _parameters(nb_path: Path, frozen: Path, rdir: Path, force: bool) -> dict:
    """``profile`` and ``run_dir`` always; ``force`` when the chapter declares it (04-06 retrain on it)."""
    params = {"profile": str(frozen), "run_dir": str(rdir)}
    if force and _declares(nb_path, "force"):
        params["force"] = True
    return params


def _declares(nb_path: Path, name: str) -> bool:
    for cell in json.loads(nb_path.read_text())["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return any(re.match(rf"{name}\s*=", line) for line in "".join(cell["source"]).splitlines())
    return False


def chapter_table(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict]:
    """Each chapter with its title (the notebook's first heading)."""
    out = []
    for s in discover_chapters(notebooks_dir):
        cells = json.loads(s.path.read_text())["cells"]
        title = next((line.lstrip("# ").strip() for c in cells if c["cell_type"] == "markdown"
                      for line in "".join(c["source"]).splitlines() if line.startswith("#")), s.name)
        out.append({"chapter": s.name, "title": title})
    return out
