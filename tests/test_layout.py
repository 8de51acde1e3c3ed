"""The run layout: one place knows every artifact path, the paths are the ones runs already have on disk,
and every path a chapter reads is one a chapter of the smoke run wrote."""
import ast
import json
from pathlib import Path

import pytest

from autorule_lib import layout as L
from autorule_lib.book.runner import NOTEBOOKS_DIR, discover_chapters
from autorule_lib.config import PROJECT_ROOT
from autorule_lib.layout import Run, RunLayout
from autorule_lib.profiles import load_profile


def test_paths_are_the_ones_existing_runs_have(tmp_path):
    """Runs made before the layout existed resume and are read back: the same file in the same place."""
    lay, a = RunLayout(tmp_path), tmp_path / "artifacts"
    expected = {
        lay.profile_file: tmp_path / "profile.yaml", lay.manifest: tmp_path / "manifest.json",
        lay.models: tmp_path / "models",
        lay.verdict_cache: tmp_path / "cache" / "verdicts.sqlite",
        lay.evaluation_cache: tmp_path / "cache" / "evaluation.sqlite",
        lay.data("ultrafeedback"): a / "01_data_preparation" / "ultrafeedback",
        lay.data("uf"): a / "01_data_preparation" / "ultrafeedback",
        lay.data_sets("mt_bench"): a / "01_data_preparation" / "mt_bench" / "sets",
        lay.rules_dir("uf"): a / "02_rule_extraction" / "uf",
        lay.rules("mt"): a / "02_rule_extraction" / "mt" / "merged_rules.json",
        lay.sft_model: a / "04_sft" / "model",
        lay.rm_model: a / "05_reward_model" / "model",
        lay.rm_normalization: a / "05_reward_model" / "rm_normalization.json",
        lay.grpo_dir("rm_only"): a / "06_grpo" / "rm_only",
        lay.grpo_final("autorule_uf"): a / "06_grpo" / "autorule_uf" / "final",
        lay.ppo_dir: a / "06_grpo" / "ppo", lay.ppo_final: a / "06_grpo" / "ppo" / "final",
        lay.responses("sft"): a / "07_evaluation" / "responses" / "sft.jsonl",
        lay.metrics(L.HACKING): a / "08_reward_hacking" / "metrics.json",
    }
    for got, want in expected.items():
        assert got == want
    assert not (tmp_path / "artifacts").exists()  # asking for a path creates nothing
    assert lay.chapter_out(L.SFT).is_dir()
    with pytest.raises(ValueError, match="unknown data source 'alpaca'"):
        lay.data("alpaca")


def test_chapter_constants_are_the_books_notebooks():
    assert list(L.CHAPTERS) == [c.name for c in discover_chapters(NOTEBOOKS_DIR)]


def test_no_module_spells_a_chapter_name_itself():
    """A chapter renamed in layout.py must not leave a copy of the old name behind in another module."""
    found = []
    for path in sorted((PROJECT_ROOT / "autorule_lib").rglob("*.py")):
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in L.CHAPTERS:
                found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.value!r}")
    assert not found, "chapter names outside autorule_lib/layout.py:\n" + "\n".join(found)


def test_a_chapter_context_is_the_run_with_its_own_folder(tmp_path):
    from autorule_lib.book.chapter import open_chapter

    ctx = open_chapter(L.RM, "smoke", tmp_path / "run")
    assert isinstance(ctx, Run) and ctx.layout == RunLayout(tmp_path / "run") and ctx.run_dir == tmp_path / "run"
    assert ctx.out == ctx.layout.rm_dir and ctx.out.is_dir() and ctx.models_dir == ctx.layout.models
    assert Run.at(ctx.profile, str(tmp_path / "run")).layout == ctx.layout


def _read_paths(run: Run) -> dict[str, Path]:
    """What chapters 02-09 read from earlier chapters, by the layout."""
    lay, prof = run.layout, run.profile
    paths = {"profile": lay.profile_file, "models": lay.models, "verdict cache": lay.verdict_cache,
             "evaluation cache": lay.evaluation_cache, "sft model": lay.sft_model, "rm model": lay.rm_model,
             "rm mu/sigma": lay.rm_normalization, "ppo": lay.ppo_final}
    for source in ("ultrafeedback", "mt_bench"):
        paths[f"{source} sets"] = lay.data_sets(source)
    for name in ("uf", "mt"):
        paths[f"rules {name}"] = lay.rules(name)
    for name in prof.grpo_run_names():
        paths[f"grpo {name}"] = lay.grpo_final(name)
        paths[f"grpo {name} log"] = lay.grpo_dir(name) / "log_history.json"
    for method in ["sft", "ppo"] + [n for n in prof.grpo_run_names() if prof.grpo_variant(n).num_episodes < 2]:
        paths[f"responses {method}"] = lay.responses(method)
    for chapter in L.METRIC_CHAPTERS + (L.RESULTS,):
        paths[f"metrics {chapter}"] = lay.metrics(chapter)
    return paths


@pytest.mark.slow
def test_every_path_a_chapter_reads_was_written_by_a_chapter_of_the_smoke_run(smoke_book):
    run_dir, _ = smoke_book
    run = Run.at(load_profile(Path(run_dir) / "profile.yaml"), run_dir)
    manifest = json.loads(run.layout.manifest.read_text())
    written = {o for rec in manifest["stages"].values() for o in rec.get("outputs", [])}
    missing, unrecorded = [], []
    for what, path in _read_paths(run).items():
        if what.endswith("cache"):
            path = path.with_suffix(".shards")  # ResponseCache's entries, beside its name (opening it would make them)
        rel = path.relative_to(run.run_dir).as_posix()
        if not path.exists():
            missing.append(f"{what}: {rel}")
        elif what not in ("profile",) and not any(o == rel or o.startswith(rel + "/") for o in written):
            unrecorded.append(f"{what}: {rel}")
    assert not missing, "the smoke run has no file where the layout says a chapter reads it:\n" + "\n".join(missing)
    assert not unrecorded, "no chapter's recorded outputs hold these:\n" + "\n".join(unrecorded)
