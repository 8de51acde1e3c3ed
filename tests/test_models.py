"""The model seam (autorule_lib.models): role resolution through the run's registry, device and dtype rules,
one identity rule; and the layering it exists for (no method package imports the smoke or book packages)."""
import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from autorule_lib import models
from autorule_lib.config import PROJECT_ROOT, ConfigError
from autorule_lib.profiles import load_profile

METHOD_PACKAGES = ("data", "extraction", "verify", "train", "evaluate", "cluster", "llm")


def _with(profile, **models_fields):
    return dataclasses.replace(profile, models=dataclasses.replace(profile.models, **models_fields))


def test_registry_hit_resolves_every_smoke_role(models_dir):
    smoke = load_profile("smoke")
    reg = json.loads((models_dir / models.REGISTRY_FILE).read_text())
    assert set(reg["roles"]) == {"policy", "tokenizer", "verifier", "judge"}
    assert all(not Path(p).is_absolute() for p in reg["roles"].values())  # a moved run dir still resolves
    got = {role: Path(models.resolve(smoke, role, models_dir)) for role in models.ROLES}
    assert got["policy"] == models_dir / "tiny-policy" and got["tokenizer"] == models_dir / "tiny-tokenizer"
    # the rule verifier is the trained tiny judge; the evaluation judge the untrained tiny Llama
    assert got["verifier"] == models_dir / "tiny-verifier-trained" and got["judge"] == models_dir / "tiny-verifier"
    assert all((p / "config.json").exists() or (p / "tokenizer.json").exists() for p in got.values())


def test_a_copied_run_directory_resolves_to_its_own_models(models_dir, tmp_path):
    from conftest import with_smoke_models

    run = with_smoke_models(models_dir, tmp_path / "run")
    assert models.resolve(load_profile("smoke"), "policy", run / "models") == str(run / "models" / "tiny-policy")


def test_hub_ids_and_paths_pass_through_untouched(tmp_path):
    paper = load_profile("paper")
    assert models.resolve(paper, "policy", tmp_path) == "meta-llama/Meta-Llama-3-8B"
    assert models.resolve(paper, "tokenizer", tmp_path) == "meta-llama/Meta-Llama-3-8B"  # defaults to the policy
    assert models.resolve(paper, "verifier", tmp_path) == "meta-llama/Meta-Llama-3-8B-Instruct"
    # a smoke profile with one role pointed elsewhere: that role is not looked up in the registry
    mixed = _with(load_profile("smoke"), verifier="/srv/models/my-judge")
    assert models.resolve(mixed, "verifier", tmp_path) == "/srv/models/my-judge"
    assert not (tmp_path / models.REGISTRY_FILE).exists()


def test_a_missing_local_build_is_a_clear_error_naming_the_role(tmp_path):
    smoke = load_profile("smoke")
    with pytest.raises(models.ModelNotBuilt, match=r"model role 'policy': models\.policy is 'tiny'.*does not list it"):
        models.resolve(smoke, "policy", tmp_path)
    models.record_models(tmp_path, {"policy": tmp_path / "gone"}, builder="test")  # listed, then deleted
    with pytest.raises(models.ModelNotBuilt, match=r"'policy'.*which is gone"):
        models.resolve(smoke, "policy", tmp_path)
    with pytest.raises(models.ModelNotBuilt, match=r"'judge': evaluation\.judge_model is 'tiny'"):
        models.resolve(smoke, "judge", tmp_path)
    with pytest.raises(ValueError, match="unknown model role 'critic'"):
        models.resolve(smoke, "critic", tmp_path)


def test_the_builder_refuses_a_build_name_it_cannot_build(tmp_path):
    from autorule_lib.smoke.build import build_models

    assert build_models(load_profile("paper"), tmp_path) == {}  # nothing local: nothing built, no registry
    assert not (tmp_path / models.REGISTRY_FILE).exists()
    odd = _with(load_profile("smoke"), build="huge", policy="huge")
    with pytest.raises(ConfigError, match="models.build"):
        build_models(odd, tmp_path)


def test_record_keeps_earlier_roles_and_rejects_unknown_ones(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    models.record_models(tmp_path, {"policy": tmp_path / "a"}, builder="test")
    reg = models.record_models(tmp_path, {"judge": tmp_path / "b"}, builder="test")
    assert reg == {"policy": tmp_path / "a", "judge": tmp_path / "b"}
    with pytest.raises(ValueError, match="unknown model role"):
        models.record_models(tmp_path, {"critic": tmp_path / "a"}, builder="test")


def test_device_rules(monkeypatch):
    prof = load_profile("smoke")
    assert models.pick_device(prof) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device(dataclasses.replace(prof, device="auto")) == "cpu"
    assert models.default_device() == "cpu"
    with pytest.raises(ConfigError, match="'cuda' requested but torch sees no CUDA device"):
        models.pick_device(dataclasses.replace(prof, device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.pick_device(dataclasses.replace(prof, device="auto")) == "cuda"
    assert models.pick_device(dataclasses.replace(prof, device="cuda")) == "cuda"


def test_rank_device_follows_the_same_rule(monkeypatch):
    from autorule_lib.train.ranks import rank_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        rank_device(dataclasses.replace(load_profile("smoke"), device="cuda"))
    assert rank_device() == "cpu"


def test_dtype_rules():
    assert models.pick_dtype("fp32", "cuda") is torch.float32
    assert models.pick_dtype("bf16", "cuda:1") is torch.bfloat16
    assert models.pick_dtype("bf16", "cpu") is torch.float32  # CPU bf16 computes in fp32
    assert models.pick_dtype("bf16", "cpu", keep_bf16_on_cpu=True) is torch.bfloat16  # the verifier's rule
    assert models.pick_dtype(None, "cpu") == "auto"  # the checkpoint's own dtype


def test_each_loader_keeps_the_dtype_it_always_had(models_dir, tmp_path):
    """bf16 profile on CPU: generation and the likelihood judge compute in fp32, the verifier's transformers
    backend in bf16; the local client and the RM scorer in the checkpoint's own dtype."""
    from autorule_lib.evaluate.generation import _load_transformers
    from autorule_lib.evaluate.judge import LikelihoodJudge
    from autorule_lib.llm.clients import LocalClient
    from autorule_lib.verify.verifier import load_local_judge

    bf16 = dataclasses.replace(load_profile("smoke"), precision="bf16")
    policy = models.resolve(bf16, "policy", models_dir)
    dtype = lambda m: next(m.parameters()).dtype  # noqa: E731
    assert dtype(_load_transformers(policy, "cpu", "bf16")[1]) is torch.float32
    assert dtype(LikelihoodJudge(policy, "cpu", "bf16")._load()[1]) is torch.float32
    assert dtype(load_local_judge(policy, bf16)[0]) is torch.bfloat16
    saved = tmp_path / "bf16-policy"  # a checkpoint saved in bf16 loads as bf16 where no precision applies
    models.load_causal_lm(policy, "cpu", "bf16", keep_bf16_on_cpu=True).save_pretrained(saved)
    models.load_tokenizer(policy).save_pretrained(saved)
    client = LocalClient(str(saved), device="cpu", engine="transformers")
    assert dtype(client._load()[1][1]) is torch.bfloat16


def test_model_id_is_one_rule_for_every_model(models_dir, tmp_path):
    import shutil

    assert models.model_id("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    copy = Path(shutil.copytree(models_dir / "tiny-policy", tmp_path / "tiny-policy"))
    first = models.model_id(copy)
    assert first.startswith("tiny-policy@") and models.model_id(copy) == first
    (copy / "notes.log").write_text("not part of the model")
    assert models.model_id(copy) == first
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert models.model_id(copy) != first


def test_a_recorded_digest_gives_rebuilt_weights_one_id_in_every_run(models_dir, tmp_path):
    """The smoke judge is rebuilt in each run directory: the id its builder records (a weights digest) makes
    the book's verifier_id columns reproduce, where a file stamp (path, mtime) would differ in every run."""
    import shutil

    judge = models_dir / "tiny-verifier-trained"
    a = Path(shutil.copytree(judge, tmp_path / "a" / judge.name))
    b = Path(shutil.copytree(judge, tmp_path / "b" / judge.name))
    os.utime(b / "model.safetensors", ns=(0, 10**9))
    assert models.model_id(a) == models.model_id(b)
    assert models.model_id(a).endswith(json.loads((judge / "tiny_verifier.json").read_text())["weights_sha256"][:20])
    (b / models.IDENTITY_FILE).unlink()  # no record: the file stamp, which differs between the two copies
    assert models.model_id(a) != models.model_id(b)


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    pkg = path.relative_to(PROJECT_ROOT).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_method_package_imports_the_smoke_package():
    """Tiny models are fixtures: the method resolves roles through the registry and never builds one.
    (Imports of the book package are the architecture test's: cluster/slurm still asks book.runner for chapters.)"""
    lib = PROJECT_ROOT / "autorule_lib"
    method_files = [p for p in lib.glob("*.py")] + [p for pkg in METHOD_PACKAGES for p in (lib / pkg).rglob("*.py")]
    bad = {str(p.relative_to(lib)): sorted(m for m in _imports(p) if m.startswith("autorule_lib.smoke"))
           for p in method_files}
    assert {k: v for k, v in bad.items() if v} == {}
    assert _imports(lib / "data" / "preparation.py") >= {"autorule_lib.models"}  # the checker sees relative imports


def test_no_method_module_tests_a_profile_name_or_the_literal_tiny():
    """Behaviour that differs for the smoke run follows a profile field (models.build, demonstration)."""
    lib = PROJECT_ROOT / "autorule_lib"
    hits = []
    for p in [*lib.glob("*.py"), *(f for pkg in (*METHOD_PACKAGES, "book") for f in (lib / pkg).rglob("*.py"))]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(v in ("tiny", "smoke") for v in consts):
                    hits.append(f"{p.relative_to(lib)}:{node.lineno}")
    assert hits == []


def test_engine_rule(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable
    assert models.pick_engine("auto", "cuda") == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    assert models.pick_engine("auto", "cuda") == "vllm" and models.pick_engine("auto", "cpu") == "transformers"
    assert models.pick_engine("transformers", "cuda") == "transformers"


def test_the_smoke_banner_follows_the_demonstration_field_not_the_name(tmp_path):
    import yaml

    from autorule_lib.book.html import _is_smoke_run
    from autorule_lib.evaluate.results import is_smoke
    from autorule_lib.profiles import dump_profile

    smoke = load_profile("smoke")
    renamed = dataclasses.replace(smoke, name="my_cpu_demo")
    assert is_smoke(renamed) and not is_smoke(dataclasses.replace(smoke, demonstration=False))
    dump_profile(renamed, tmp_path / "a" / "profile.yaml")
    assert _is_smoke_run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "profile.yaml").write_text(yaml.safe_dump({"name": "smoke", "models": {"policy": "tiny"}}))
    assert not _is_smoke_run(tmp_path / "b")  # a name alone says nothing


def test_a_damaged_registry_is_a_clear_error(tmp_path):
    from autorule_lib.artifacts import CorruptFileError

    (tmp_path / models.REGISTRY_FILE).write_text('{"roles": ')
    with pytest.raises(CorruptFileError, match="registry.json"):
        models.resolve(load_profile("smoke"), "policy", tmp_path)
    (tmp_path / models.REGISTRY_FILE).write_text('{"builder": "x"}')
    with pytest.raises(CorruptFileError, match="no 'roles' mapping"):
        models.registry(tmp_path)
