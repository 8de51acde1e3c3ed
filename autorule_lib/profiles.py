"""Profile files: find a profile by name or path, read its YAML (with ``inherit``), check it, freeze it.

The typed sections live in ``config``; this module turns files into a ``Profile`` and back, resolving
local data sources against the file that names them so a frozen profile works from any directory.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from .config import (
    PROFILES_DIR,
    PROJECT_ROOT,
    ConfigError,
    Profile,
    _build,
    _deep_merge,
)


def is_local_source(value: str) -> bool:
    """Local paths are written with a leading '/', './', '../' or '~'; anything else is a Hub id."""
    return value.startswith(("/", "./", "../", "~"))


def _source_fields(cls, prefix: str = "") -> list[tuple[str, ...]]:
    """Key paths of the fields that name a data source or file (metadata ``source=True``)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(f.name, *rest) for rest in _source_fields(tp)]
        elif f.metadata.get("source"):
            out.append((f.name,))
    return out


def _absolutise_sources(data: dict, root: Path) -> None:
    """Make a file's relative local paths absolute against that file's root, before merging."""
    for keys in _source_fields(Profile):
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and is_local_source(value):
            node[keys[-1]] = str((root / Path(value).expanduser()).resolve())


def _check_sources_exist(profile: "Profile") -> None:
    for keys in _source_fields(Profile):
        obj = profile
        for k in keys:
            obj = getattr(obj, k)
        if isinstance(obj, str) and is_local_source(obj) and not Path(obj).exists():
            raise ConfigError(f"{'.'.join(keys)}: no such file or directory: {obj}")


def profile_path(name_or_file: str | Path) -> Path:
    """A profile name ('smoke') or a path to a YAML file."""
    p = Path(name_or_file).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"profile file not found: {p.resolve()}")
        return p.resolve()
    candidate = PROFILES_DIR / f"{name_or_file}.yaml"
    if not candidate.is_file():
        have = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {str(name_or_file)!r}: not a file and not one of {have}")
    return candidate


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of keys")
    _absolutise_sources(data, PROJECT_ROOT if path.is_relative_to(PROJECT_ROOT) else path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = profile_path(parent if not str(parent).startswith(".") else path.parent / parent)
    return _deep_merge(_read_yaml(parent_path, seen + (path,)), data)


def resolve_local_path(profile: Profile, value: str, profile_file: str | Path | None = None) -> Path:
    """A path named inside a profile section that the loader does not absolutise (e.g. in grpo_variants):
    absolute or ``~`` as is; relative against the project root for profiles inside the project, else
    against the profile file's folder (the rule for every local path)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    src = Path(profile_file or profile.source_file or PROJECT_ROOT / "x")
    root = PROJECT_ROOT if src.resolve().is_relative_to(PROJECT_ROOT) else src.parent
    return (root / p).resolve()


def load_profile(name_or_file: str | Path) -> Profile:
    """Load, merge ``extends`` chains, type-check and resolve a profile."""
    path = profile_path(name_or_file)
    data = _read_yaml(path)
    data.pop("source_file", None)
    data["name"] = _own_name(path)  # never the parent's: a run directory belongs to one profile
    profile = _build(Profile, data, "")
    _check_sources_exist(profile)
    for name in profile.grpo_variants:  # validate every named run now, not mid-training
        rule_file = profile.grpo_variant(name).rule_set_file
        if rule_file and not resolve_local_path(profile, rule_file, path).is_file():
            raise ConfigError(f"grpo_variants.{name}.rule_set_file: no such file: {resolve_local_path(profile, rule_file, path)}")
    if profile.grpo.rule_set_file and not resolve_local_path(profile, profile.grpo.rule_set_file, path).is_file():
        raise ConfigError(f"grpo.rule_set_file: no such file: {resolve_local_path(profile, profile.grpo.rule_set_file, path)}")
    for name in profile.grpo_runs or []:
        if name not in profile.grpo_variants:
            raise ConfigError(f"grpo_runs: {name!r} is not a name in grpo_variants ({sorted(profile.grpo_variants)})")
    profile.source_file = str(path)
    return profile


def dump_profile(profile: Profile, path: str | Path) -> Path:
    """Write the resolved profile (what a run actually used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = profile.to_dict()
    d.pop("source_file", None)
    path.write_text(f"# resolved from {profile.source_file}; hash {profile.hash()}\n"
                    + yaml.safe_dump(d, sort_keys=False))
    return path


def run_dir(profile: Profile, output_dir: str | Path | None = None) -> Path:
    """Where a profile's run lives: <runs_dir>/<name> unless given."""
    if output_dir:
        return Path(output_dir).expanduser().resolve()
    base = Path(profile.runs_dir).expanduser()
    return (base if base.is_absolute() else PROJECT_ROOT / base).resolve() / profile.name


def _own_name(path: Path) -> str:
    """The profile's name: its file's own ``name`` key, else the file name. Never inherited through
    ``extends``, so a small profile on top of ``smoke`` does not write into the smoke run."""
    own = (yaml.safe_load(path.read_text()) or {}).get("name")
    name = str(own) if own is not None else path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{path}: name: {name!r} is not a plain folder name (letters, digits, '.', '_', '-')")
    return name
