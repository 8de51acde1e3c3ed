"""The one seam between the method and its models: which model a role names, where it runs, in which
dtype, how it loads, which engine generates with it, and how a saved model is identified.

Why one module: the loaders of the evaluation generator, the rule verifier, the likelihood judge and
the local LLM client, and two device resolvers, used to be separate copies that disagreed (one kept bf16
on CPU, two dropped it, one never asked), and the GPU audit traced device bugs to exactly those copies.

How a role resolves: a profile names a Hub id or a local path for each role, or the name
``models.build`` gives models built locally (the smoke profile's ``tiny``). Those are looked up in the
run's ``models/registry.json``, which their builder writes (``autorule_lib.smoke``, called only by entry
points: the chapter prologue, the CLI, test fixtures, benchmarks). The method never builds a model and
never knows how one came to exist; training subprocesses read the same registry file, so every process
of a run finds the same models.
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifacts import CorruptFileError, atomic_write_text, files_stamp, read_json
from .config import ConfigError, Profile

REGISTRY_FILE = "registry.json"
IDENTITY_FILE = "model_identity.json"  # {"sha256": ...} written by a builder that hashed the weights it saved
# What a saved model's identity covers: weights, configs, tokenizer files, chat templates (not logs or optimizer state).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")
ROLES = {  # role -> where the profile names its model
    "policy": "models.policy",
    "tokenizer": "models.tokenizer (default: models.policy)",
    "verifier": "models.verifier",
    "judge": "evaluation.judge_model",
}


class ModelNotBuilt(FileNotFoundError):
    """A role names a locally built model that the run's registry does not list (or lists but is gone)."""


def role_value(profile: Profile, role: str) -> str:
    """What the profile writes for ``role``: a Hub id, a path, or the local-build name."""
    values = {"policy": profile.models.policy, "tokenizer": profile.models.tokenizer or profile.models.policy,
              "verifier": profile.models.verifier, "judge": profile.evaluation.judge_model}
    if role not in values:
        raise ValueError(f"unknown model role {role!r} (have {', '.join(ROLES)})")
    return values[role]


def builds_locally(profile: Profile, role: str) -> bool:
    """True when ``role`` names the profile's local-build name: its model comes from the registry."""
    return profile.models.build is not None and role_value(profile, role) == profile.models.build


def registry(models_dir: str | Path) -> dict[str, Path]:
    """{role: folder} of the models built for this run (empty when nothing was built)."""
    return {role: Path(models_dir) / rel for role, rel in _recorded_roles(Path(models_dir)).items()}


def _recorded_roles(models_dir: Path) -> dict[str, str]:
    path = models_dir / REGISTRY_FILE
    if not path.exists():
        return {}
    data = read_json(path)
    roles = data.get("roles") if isinstance(data, dict) else None
    if not isinstance(roles, dict):
        raise CorruptFileError(f"{path}: no 'roles' mapping; delete it and open a chapter again to rebuild it")
    return roles


def record_models(models_dir: str | Path, paths: dict[str, str | Path], builder: str) -> dict[str, Path]:
    """Add built models to the registry (folders under ``models_dir``, stored relative to it so a moved run
    directory still resolves). Returns the whole registry."""
    models_dir = Path(models_dir)
    roles = _recorded_roles(models_dir)
    for role, p in paths.items():
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r} (have {', '.join(ROLES)})")
        roles[role] = str(Path(p).resolve().relative_to(models_dir.resolve()))
    text = json.dumps({"builder": builder, "roles": roles}, indent=1, sort_keys=True) + "\n"
    atomic_write_text(models_dir / REGISTRY_FILE, text)
    return registry(models_dir)


def resolve(profile: Profile, role: str, models_dir: str | Path) -> str:
    """The Hub id or local path the method loads for ``role`` ('policy', 'tokenizer', 'verifier', 'judge')."""
    value = role_value(profile, role)
    if not builds_locally(profile, role):
        return value
    path = registry(models_dir).get(role)
    if path is None or not path.exists():
        where = Path(models_dir) / REGISTRY_FILE
        found = "does not list it" if path is None else f"lists {path}, which is gone"
        raise ModelNotBuilt(
            f"model role {role!r}: {ROLES[role]} is {value!r}, a locally built model, but {where} {found}; "
            f"build it first (opening a chapter does, or autorule_lib.smoke.build.build_models)")
    return str(path)


# ---------------------------------------------------------------- device, dtype, engine

def default_device() -> str:
    """The GPU when torch sees one, else the CPU (for callers that have no profile)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(profile: Profile) -> str:
    """The profile's device ('auto': the GPU when there is one); asking for CUDA where there is none is an error."""
    if profile.device == "auto":
        return default_device()
    if profile.device == "cuda" and default_device() != "cuda":
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return profile.device


def pick_dtype(precision: str | None, device: str, *, keep_bf16_on_cpu: bool = False):
    """The ``dtype`` to load in for ``precision`` ('fp32', 'bf16', or None: the checkpoint's own) on ``device``.

    bf16 on a CPU becomes fp32: CPU bf16 matmuls are slow on most CPUs and round differently from the GPU
    kernels a bf16 profile is meant for, so a CPU run of such a profile computes in full precision.
    ``keep_bf16_on_cpu`` keeps bf16 anyway: the rule verifier's transformers backend has always loaded its
    judge in the profile's precision on every device, and keeps doing so (its verdicts are cached per model).
    None ('auto', transformers' default) is what the local LLM client and the reward-model scorer have
    always loaded in: they have no precision to follow.
    """
    import torch

    if precision is None:
        return "auto"
    if precision == "bf16" and (keep_bf16_on_cpu or not str(device).startswith("cpu")):
        return torch.bfloat16
    return torch.float32


def pick_engine(engine: str, device: str) -> str:
    """'auto': vLLM when it is importable and the model runs on a GPU, else transformers."""
    if engine != "auto":
        return engine
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm" if device != "cpu" else "transformers"


# ---------------------------------------------------------------- loading

def load_tokenizer(path: str | Path, *, padding_side: str | None = None, pad_with_eos: bool = False):
    """A tokenizer; ``pad_with_eos`` gives one without a pad token EOS as its pad (the paper's convention
    in training and generation: pad = eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if padding_side is not None:
        tok.padding_side = padding_side
    if pad_with_eos and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, device: str, precision: str | None, *, keep_bf16_on_cpu: bool = False):
    """A causal LM in eval mode on ``device``, in ``pick_dtype(precision, device)``."""
    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(precision, device, keep_bf16_on_cpu=keep_bf16_on_cpu)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def load_sequence_classifier(path: str | Path, device: str, precision: str | None):
    """A sequence classifier (the reward model) in eval mode on ``device``."""
    from transformers import AutoModelForSequenceClassification

    dtype = pick_dtype(precision, device)
    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype).to(device).eval()


# ---------------------------------------------------------------- identity

def model_id(path_or_id: str | Path) -> str:
    """Identity of a model for caches and provenance: a Hub id as given; a local folder as its name and the
    content digest its builder recorded (``IDENTITY_FILE``), else a stamp of each weight/config file's path,
    size and modification time.

    One rule for checkpoints, verifiers and judges: a model retrained or rebuilt in place gets a new id (so a
    cache never serves answers of the old weights), and no gigabytes of weights are hashed to find out. A
    builder that hashed what it saved (the smoke judge) records it, so the same weights rebuilt in another
    run directory keep one id and the book's provenance columns reproduce."""
    p = Path(path_or_id)
    if not p.exists():
        return str(path_or_id)
    if (p / IDENTITY_FILE).is_file():
        return f"{p.resolve().name}@{read_json(p / IDENTITY_FILE)['sha256'][:20]}"
    return f"{p.resolve().name}@{files_stamp(p, WEIGHT_SUFFIXES)}"


def record_identity(folder: str | Path, sha256: str) -> Path:
    """Record a saved model's content digest (computed by its builder) as its identity (``model_id``)."""
    return atomic_write_text(Path(folder) / IDENTITY_FILE, json.dumps({"sha256": sha256}) + "\n")
