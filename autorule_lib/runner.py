"""Execute the numbered notebooks of the book in order with papermill, with a run manifest.

A stage is skipped when its fingerprint (its notebook's code, the profile hash, the library code and
every earlier stage's fingerprint) matches a previous successful run, unless forced.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import git_commit, now, package_versions, read_json, write_json
from .config import PROJECT_ROOT, Profile, dump_profile, run_dir as default_run_dir
from .redaction import scrub_tree

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
LIBRARY_DIR = Path(__file__).resolve().parent
STAGE_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
KERNEL_NAME = "autorule"


class StageFailed(RuntimeError):
    """A notebook raised; the message shows the stage, the cell and the error."""


@dataclass
class Stage:
    name: str
    path: Path

    @property
    def number(self) -> str:
        return self.name[:2]


def discover_stages(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Stage]:
    return [Stage(p.stem, p) for p in sorted(notebooks_dir.glob("*.ipynb")) if STAGE_NAME.match(p.name)]


def select_stages(stages: list[Stage], only: list[str] | None) -> list[Stage]:
    """``only`` items may be a number ('02'), a full name, or a name without its number."""
    if not only:
        return stages
    chosen = []
    for item in only:
        match = [s for s in stages if item in (s.number, s.name, s.name[3:])]
        if not match:
            raise ValueError(f"--only {item!r}: no such stage (have {[s.name for s in stages]})")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen, key=lambda s: s.name)


def _code_hash(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    return hashlib.sha256(json.dumps([(c["cell_type"], "".join(c["source"])) for c in cells]).encode()).hexdigest()


def library_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(LIBRARY_DIR.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".txt", ".md", ".yaml", ".json") and "__pycache__" not in p.parts:
            h.update(p.relative_to(LIBRARY_DIR).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def fingerprints(stages: list[Stage], profile: Profile) -> dict[str, str]:
    """Chained input hashes: a change to a stage re-runs it and everything after it."""
    out, prev, lib = {}, "", library_hash()
    for s in stages:
        prev = hashlib.sha256(f"{prev}|{_code_hash(s.path)}|{profile.hash()}|{lib}".encode()).hexdigest()[:16]
        out[s.name] = prev
    return out


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def _describe_failure(stage: Stage, err: Exception, executed: Path) -> str:
    cell = getattr(err, "cell_index", None)
    source = (getattr(err, "source", "") or "").strip().splitlines()
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    lines = [f"stage {stage.name} failed" + (f" in cell {cell}" if cell is not None else "") + f": {ename}: {evalue}"]
    if source:
        lines += ["  cell source:"] + [f"    {line}" for line in source[:15]]
    lines.append(f"  executed notebook (with the full traceback): {executed}")
    return "\n".join(lines)


def run_book(profile: Profile, only: list[str] | None = None, output_dir: str | Path | None = None,
             force: bool = False, progress: bool = True, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """Run the selected stages; returns the manifest. Raises StageFailed on the first failing stage."""
    import papermill as pm

    rdir = default_run_dir(profile, output_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    frozen = dump_profile(profile, rdir / "profile.yaml")
    stages = discover_stages(notebooks_dir)
    fps = fingerprints(stages, profile)
    manifest_path = rdir / "manifest.json"
    old = read_json(manifest_path) if manifest_path.exists() else {}
    manifest = {
        "profile": profile.name, "profile_file": profile.source_file, "profile_hash": profile.hash(),
        "seed": profile.seed, "git_commit": git_commit(), "packages": package_versions(),
        "python": sys.version.split()[0], "started_at": now(), "ended_at": None,
        "stages": old.get("stages", {}) if old.get("profile_hash") == profile.hash() else {},
    }
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONHASHSEED": str(profile.seed)}
    os.environ.update(env)  # the kernel inherits this process's environment
    selected = select_stages(stages, only)
    for i, stage in enumerate(selected, 1):
        executed = rdir / "notebooks" / stage.path.name
        prev = manifest["stages"].get(stage.name, {})
        if not force and prev.get("status") == "ok" and prev.get("fingerprint") == fps[stage.name] and executed.exists():
            print(f"[{i}/{len(selected)}] {stage.name}: unchanged, skipped (use --force to re-run)", flush=True)
            continue
        print(f"[{i}/{len(selected)}] {stage.name}: running", flush=True)
        record = {"status": "running", "fingerprint": fps[stage.name], "started_at": now(),
                  "executed_notebook": str(executed)}
        manifest["stages"][stage.name] = record
        write_json(manifest_path, manifest)
        t0 = time.perf_counter()
        executed.parent.mkdir(parents=True, exist_ok=True)
        try:
            pm.execute_notebook(str(stage.path), str(executed), kernel_name=_kernel_name(), cwd=str(notebooks_dir),
                                parameters={"profile": str(frozen), "run_dir": str(rdir)}, progress_bar=progress,
                                request_save_on_cell_execute=True, language="python")
            record["status"] = "ok"
        except Exception as err:  # papermill wraps the kernel's error; keep it for the manifest
            record.update(status="failed", error=_describe_failure(stage, err, executed))
        finally:
            record.update(ended_at=now(), seconds=round(time.perf_counter() - t0, 1))
            redacted = scrub_tree(rdir)
            if redacted:
                record["redacted"] = redacted
                print(f"  warning: secret values found and redacted in {len(redacted)} file(s)", file=sys.stderr)
            manifest["ended_at"] = now()
            write_json(manifest_path, manifest)
        if record["status"] == "failed":
            raise StageFailed(record["error"])
        print(f"    done in {record['seconds']} s", flush=True)
    return manifest


def stage_table(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict]:
    """Each stage with its chapter title (the notebook's first heading)."""
    out = []
    for s in discover_stages(notebooks_dir):
        cells = json.loads(s.path.read_text())["cells"]
        title = next((line.lstrip("# ").strip() for c in cells if c["cell_type"] == "markdown"
                      for line in "".join(c["source"]).splitlines() if line.startswith("#")), s.name)
        out.append({"stage": s.name, "chapter": title})
    return out
