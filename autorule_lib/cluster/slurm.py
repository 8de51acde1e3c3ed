"""Cluster runs under SLURM: one job script per chapter, chained with ``afterok``, plus a final book job.

``autorule slurm`` freezes the profile into the run directory, plans each chapter's allocation, renders the
editable templates in ``configs/slurm/`` into ``<scripts dir>/NN_chapter.sbatch`` and ``submit.sh``, writes
the estimates, and (unless ``--dry-run``) runs ``submit.sh``, which chains the jobs with ``sbatch --parsable``.

Every job runs ``autorule run --profile <run dir>/profile.yaml --only NN --output-dir <run dir>``, the same
command as on a workstation, so a requeued job simply runs it again: finished chapters are skipped by the
runner and training resumes from its last checkpoint. What SLURM adds reaches the library only through
these environment variables, read by ``train.launch.accelerate_command``:

  AUTORULE_NUM_PROCESSES      training processes of the allocation (all nodes together)
  AUTORULE_NUM_MACHINES       training nodes; >1 starts one accelerate launcher per node through
  AUTORULE_NODE_LAUNCHER      (an ``srun`` prefix), each told its rank by ``python -m autorule_lib.cluster.slurm node-rank``
  AUTORULE_MAIN_PROCESS_IP / AUTORULE_MAIN_PROCESS_PORT   the rendezvous of rank 0

vLLM servers are started where the profile says a stage talks to one: ``trl vllm-serve`` for GRPO runs with
``use_vllm`` and ``vllm_mode: server`` (TRL's trainer looks for it at localhost:8000), and ``vllm serve`` of the
verifier when ``verifier.backend`` is ``vllm_server`` (the paper profile's default) or ``openai`` with an
``api_base_url`` on the job's own node (localhost). Both are addressed as localhost, so a job with servers runs
on one node: servers on its first GPUs, the stage on the rest. (``verifier.backend: vllm`` is an engine inside
the process, not a server: nothing is started for it, and a multi-process launch refuses it.)

Every job exports one shared ``HF_HOME``; the first job (``00_fetch_models``) downloads the profile's Hub
models and data sets into it, and the others run with ``HF_HUB_OFFLINE=1``. Every job sets ``no_proxy`` for
loopback, so an inherited ``http_proxy`` never intercepts the servers' health checks and calls.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import layout
from ..config import PROJECT_ROOT, Profile
from ..profiles import dump_profile, run_dir as default_run_dir
from ..redaction import secret_values
from .estimates import estimate, write_estimates
from ..profiles import load_profile

TEMPLATES_DIR = PROJECT_ROOT / "configs" / "slurm"
POLICY_VLLM_PORT = 8000      # TRL's default vllm_server_port: the trainer finds the server without being told
LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")
CPU_ONLY = {layout.OVERVIEW, layout.DATA, layout.RESULTS}
FETCH_JOB = "00_fetch_models"
TRAINING = {layout.SFT, layout.RM, layout.GRPO}
USES_VERIFIER = {layout.AGREEMENT, layout.GRPO, layout.HACKING}


class SlurmError(ValueError):
    """The requested allocation cannot run this profile, or a script would carry a secret."""


@dataclass
class Options:
    partition: str | None = None
    cpu_partition: str | None = None     # CPU-only chapters (default: --partition)
    account: str | None = None
    nodes: int = 1                       # for training chapters; every other chapter runs on one node
    gpus_per_node: int | None = None     # default: the profile's num_processes (8 for paper)
    time: str = "24:00:00"               # GPU jobs; longer chapters requeue themselves and resume
    cpu_time: str = "04:00:00"
    cpus_per_gpu: int = 8
    policy_vllm_gpus: int | None = None  # default: 1 when a GRPO run uses vllm_mode 'server'
    verifier_gpus: int | None = None     # default: 4 (the paper's) when the verifier is a local server
    parallel_runs: bool = False          # one job per GRPO run and PPO, side by side, then the 06 notebook
    max_requeues: int = 20
    setup: list[str] = field(default_factory=list)       # shell lines run first, e.g. 'module load cuda'
    sbatch_args: list[str] = field(default_factory=list)  # extra '#SBATCH' options, e.g. '--qos=high'
    only: list[str] | None = None
    requeue_grace_s: int = 600           # USR1 this long before the time limit: requeue before being killed
    ready_timeout_s: int = 1800          # vLLM servers load 8B weights; a cold cache is slow
    # Memory: SLURM's default per CPU is site-specific and often a few GB, too little to load 8B weights.
    mem: str | None = None               # every job: --mem (e.g. '0' = the whole node); overrides the two below
    mem_per_gpu: str = "96G"             # GPU jobs: --mem-per-gpu
    cpu_mem: str = "32G"                 # CPU-only jobs: --mem
    # Model weights and data: fetched once into a shared HF_HOME that every job exports; the jobs then run
    # with HF_HUB_OFFLINE=1 (compute nodes often have no internet, and 16 ranks must not download at once).
    hf_home: str | None = None           # default: $HF_HOME of the submitting shell, else <run dir>/hf_home
    fetch_models: str = "job"            # 'job': a first job fetches them; 'done': already fetched; 'off': jobs download


@dataclass
class Service:
    name: str
    gpu_start: int
    gpus: int
    port: int
    command: list[str]


@dataclass
class Job:
    key: str                       # script name without suffix: '04_sft', '06_grpo.autorule_uf', '99_book'
    chapter: str                   # the chapter it runs ('fetch_models', 'book' for the two extra jobs)
    command: list[str]
    nodes: int = 1
    gpus: int = 0                  # per node
    train_procs: int = 0           # >0: a training allocation (AUTORULE_NUM_PROCESSES is exported)
    train_gpu_start: int = 0       # on one node, training gets the GPUs after the servers'
    services: list[Service] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    dependency: str = "afterok"
    hub_offline: bool = False      # HF_HUB_OFFLINE=1: the models and data sets were fetched into HF_HOME


def executables() -> dict[str, str]:
    """This environment's interpreter and entry point: a job must run the code that was tested here."""
    bindir = Path(sys.executable).parent
    autorule = bindir / "autorule"
    return {"python": sys.executable, "autorule": str(autorule) if autorule.exists() else "autorule",
            "bindir": str(bindir)}


def required_secrets(profile: Profile) -> list[str]:
    """Names (never values) of the variables this profile's stages read; the jobs warn if one is unset."""
    names = set()
    local = lambda v: v == profile.models.build or v.startswith(("/", "./", "../", "~"))  # noqa: E731
    if not all(local(m) for m in (profile.models.policy, profile.models.verifier)):
        names.add("HF_TOKEN")  # gated Llama weights
    if profile.data.hf_username:
        names.add("HF_TOKEN")
    if profile.extraction.llm == "bedrock":
        names.update({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    if profile.extraction.llm == "openai":
        names.add(profile.extraction.api_key_env)
    if profile.evaluation.judge_llm == "openai":
        names.add(profile.evaluation.judge_api_key_env)
    if profile.evaluation.alpaca_eval == "run":
        names.add("OPENAI_API_KEY")
    if profile.verifier.backend == "openai" and not local_verifier_port(profile):
        names.add(profile.extraction.api_key_env)  # the verifier's API client reads the extraction key
    if profile.verifier.backend == "bedrock":
        names.update({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    if profile.report_to == "wandb":
        names.add("WANDB_API_KEY")
    return sorted(names)


# ---------------------------------------------------------------- planning

def _grpo_runs(profile: Profile) -> dict:
    return {name: profile.grpo_variant(name) for name in profile.grpo_run_names()}


def local_verifier_port(profile: Profile) -> int | None:
    """The port of the verifier server the profile expects on its own node, or None."""
    from urllib.parse import urlparse

    url = urlparse(profile.verifier.api_base_url or "")
    if profile.verifier.backend in ("openai", "vllm_server") and url.hostname in LOCAL_HOSTS:
        return url.port or 80
    return None


def _services(profile: Profile, opts: Options, chapter: str, runs: dict, run_dir: Path) -> list[Service]:
    """vLLM servers of a job, on its first GPUs: the policy server, then the verifier server."""
    if profile.device == "cpu":
        return []
    out, start = [], 0
    bindir = Path(executables()["bindir"])
    if chapter == layout.GRPO and any(v.use_vllm and v.vllm_mode == "server" for v in runs.values()):
        n = 1 if opts.policy_vllm_gpus is None else opts.policy_vllm_gpus
        if n:
            # TRL pushes the trainer's weights into this server at every step; it starts from the SFT model
            cmd = [str(bindir / "trl"), "vllm-serve", "--model", str(layout.RunLayout(run_dir).sft_model),
                   "--tensor_parallel_size", str(n), "--host", "0.0.0.0", "--port", str(POLICY_VLLM_PORT)]
            out.append(Service("policy-vllm", start, n, POLICY_VLLM_PORT, cmd))
            start += n
    port = local_verifier_port(profile)
    autorule = any(v.reward == "autorule" for v in runs.values()) if chapter == layout.GRPO else True
    if port and chapter in USES_VERIFIER and autorule:
        n = 4 if opts.verifier_gpus is None else opts.verifier_gpus
        if n:
            # one server, n engines (data parallel); the verifier sends the model id as the model name
            cmd = [str(bindir / "vllm"), "serve", profile.models.verifier, "--host", "0.0.0.0", "--port", str(port),
                   "--enable-prefix-caching", "--dtype", "bfloat16", "--data-parallel-size", str(n),
                   "--served-model-name", profile.models.verifier]
            out.append(Service("verifier-vllm", start, n, port, cmd))
    return out


def _training_job(profile: Profile, opts: Options, job: Job, gpus: int, errors: list[str]) -> Job:
    """Fill in nodes and processes: servers take the first GPUs of the (single) node, training the rest."""
    used = sum(s.gpus for s in job.services)
    if profile.device == "cpu":
        job.train_procs, job.gpus = 1, 0
        return job
    # servers are reached at localhost (TRL's default host, the profile's verifier URL): keep such a job on one node
    nodes = 1 if job.services else opts.nodes
    job.gpus, job.nodes = gpus, nodes
    job.train_gpu_start, job.train_procs = used, nodes * gpus - used
    if job.train_procs < 1:
        errors.append(f"{job.key}: the vLLM servers take {used} of {gpus} GPUs and leave none for training; "
                      f"pass more --gpus-per-node or fewer --policy-vllm-gpus/--verifier-gpus")
    return job


def _check_batches(profile: Profile, job: Job) -> list[str]:
    """Fail now, not two days in: global batches must divide into per-device batch x processes."""
    n, errs = job.train_procs, []
    checks = {layout.SFT: [("sft", profile.sft.global_batch_size, profile.sft.per_device_batch_size)],
              layout.RM: [("reward_model", profile.reward_model.global_batch_size,
                         profile.reward_model.per_device_batch_size)]}
    runs = _grpo_runs(profile)
    only = job.key.split(".", 1)[1] if "." in job.key else None
    checks[layout.GRPO] = [(f"grpo_variants.{k}", v.train_batch_size, v.per_device_batch_size)
                         for k, v in runs.items() if only in (None, k)]
    for key, total, per_device in checks.get(job.chapter, []):
        if n > 1 and total % (per_device * n):
            errs.append(f"{job.key}: {key} batch {total} is not a multiple of per_device_batch_size {per_device} "
                        f"x {n} training processes; change --gpus-per-node/--nodes or the vLLM server GPUs")
    return errs


def plan(profile: Profile, opts: Options, run_dir: Path, chapters: list[str]) -> list[Job]:
    """The jobs in submission order, each with the keys of the jobs it waits for."""
    exe, frozen = executables(), str(layout.RunLayout(run_dir).profile_file)
    gpus = opts.gpus_per_node or max(1, profile.num_processes)
    runs = _grpo_runs(profile)
    run_cmd = lambda s: [exe["autorule"], "run", "--profile", frozen, "--only", s, "--output-dir", str(run_dir)]  # noqa: E731
    jobs, prev, errors = [], [], []
    if opts.fetch_models not in ("job", "done", "off"):
        errors.append(f"--fetch-models {opts.fetch_models!r}: use job, done or off")
    if opts.fetch_models == "job" and fetch_targets(profile)["models"] + fetch_targets(profile)["datasets"]:
        cmd = [exe["python"], "-m", "autorule_lib.cluster.slurm", "fetch-models", "--profile", frozen]
        jobs.append(Job(FETCH_JOB, "fetch_models", cmd))
        prev = [FETCH_JOB]
    if opts.verifier_gpus and not local_verifier_port(profile):
        errors.append("--verifier-gpus: this profile's verifier is not a server on the job's node; ask for one with "
                      "verifier: {backend: vllm_server, api_base_url: http://127.0.0.1:8100/v1}")

    def add(job: Job, kind: str) -> Job:
        if kind == "train":
            job = _training_job(profile, opts, job, gpus, errors)
            errors.extend(_check_batches(profile, job))
        elif kind == "gpu" and profile.device != "cpu":
            job.gpus = 1 + sum(s.gpus for s in job.services)
            job.train_gpu_start = sum(s.gpus for s in job.services)
            if job.gpus > gpus:
                errors.append(f"{job.key}: its vLLM servers and the notebook need {job.gpus} GPUs, a node has {gpus}; "
                              f"pass --verifier-gpus {gpus - 1} or fewer")
        jobs.append(job)
        return job

    for chapter in chapters:
        kind = ("cpu" if chapter in CPU_ONLY or (chapter == layout.RULES and profile.extraction.llm != "local")
                else "train" if chapter in TRAINING else "gpu")
        if chapter == layout.GRPO and opts.parallel_runs:
            parts = []
            for name in runs:
                cmd = [exe["python"], "-m", "autorule_lib.train.launch", "grpo", "--launch", "--profile", frozen,
                       "--run-dir", str(run_dir), "--variant", name]
                svc = _services(profile, opts, chapter, {name: runs[name]}, run_dir)
                parts.append(add(Job(f"{chapter}.{name}", chapter, cmd, services=svc, after=prev), "train"))
            cmd = [exe["python"], "-m", "autorule_lib.train.launch", "ppo", "--launch", "--profile", frozen,
                   "--run-dir", str(run_dir)]
            parts.append(add(Job(f"{chapter}.ppo", chapter, cmd, after=prev), "train"))
            # the notebook then only reads the finished runs: one process, one GPU, no servers
            nb = add(Job(chapter, chapter, run_cmd(chapter), after=[p.key for p in parts]), "gpu")
            nb.train_procs = 1
            prev = [nb.key]
            continue
        svc = _services(profile, opts, chapter, runs, run_dir)
        prev = [add(Job(chapter, chapter, run_cmd(chapter), services=svc, after=prev), kind).key]
    # afterany: the book is built even when a chapter failed, and its manifest page names the failed chapters
    jobs.append(Job("99_book", "book", [exe["autorule"], "book", "--profile", frozen, "--output-dir", str(run_dir)],
                    after=prev, dependency="afterany"))
    for job in jobs:  # alpaca_eval reads its instructions and GLM table from the Hub at run time
        job.hub_offline = (opts.fetch_models != "off" and job.key != FETCH_JOB
                           and not (job.chapter == layout.EVALUATION and profile.evaluation.alpaca_eval == "run"))
    if errors:
        raise SlurmError("\n".join(errors))
    return jobs


# ---------------------------------------------------------------- model and data pre-fetch

def _is_hub_id(value: str | None, profile: Profile) -> bool:
    """Not a local path, nor the name of a locally built model (models.build)."""
    return bool(value) and value != profile.models.build and not value.startswith(("/", "./", "../", "~"))


def fetch_targets(profile: Profile) -> dict[str, list[str]]:
    """Hub ids the profile's stages load: models (policy, tokenizer, verifier, local judge and extractor) and
    data sets. Local paths and locally built models need nothing."""
    models = [profile.models.policy, profile.models.tokenizer, profile.models.verifier]
    if profile.evaluation.judge_llm == "local":
        models.append(profile.evaluation.judge_model)
    if profile.extraction.llm == "local":
        models.append(profile.extraction.model)
    data = [profile.data.ultrafeedback_source, profile.data.mt_bench_source]
    uniq = lambda xs: list(dict.fromkeys(x for x in xs if _is_hub_id(x, profile)))  # noqa: E731
    return {"models": uniq(models), "datasets": uniq(data)}


def hf_home(opts: Options, run_dir: Path) -> str:
    return opts.hf_home or os.environ.get("HF_HOME") or str(run_dir / "hf_home")


MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]  # no .bin/.pth duplicates


def fetch(profile: Profile, *, snapshot_download=None, load_dataset=None) -> dict[str, list[str]]:
    """Download every Hub model and data set of the profile into the current HF_HOME (run once, online)."""
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    if load_dataset is None:
        from datasets import load_dataset
    targets = fetch_targets(profile)
    for repo in targets["models"]:
        print(f"fetching model {repo}", flush=True)
        snapshot_download(repo, allow_patterns=MODEL_FILES)  # HF_TOKEN from the environment (gated Llama-3)
    for repo in targets["datasets"]:
        print(f"fetching data set {repo}", flush=True)
        load_dataset(repo)  # into HF_HOME's datasets cache, which offline jobs read
    return targets


# ---------------------------------------------------------------- rendering

def _environment(templates_dir: Path):
    import jinja2  # a dependency of torch, so always installed

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["cmd"] = lambda v: shlex.join(str(x) for x in v)
    return env


def write_jobs(profile: Profile, opts: Options, run_dir: str | Path | None = None,
               scripts_dir: str | Path | None = None, templates_dir: str | Path = TEMPLATES_DIR,
               chapters: list[str] | None = None) -> dict:
    """Freeze the profile, write one script per job, submit.sh and the estimates; returns what was written."""
    rdir = default_run_dir(profile, run_dir)
    sdir = Path(scripts_dir).expanduser().resolve() if scripts_dir else layout.RunLayout(rdir).slurm
    if chapters is None:
        chapters = layout.chapter_names(opts.only)
    jobs = plan(profile, opts, rdir, chapters)
    rdir.mkdir(parents=True, exist_ok=True)
    frozen = dump_profile(profile, layout.RunLayout(rdir).profile_file)
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    env, exe = _environment(Path(templates_dir)), executables()
    common = dict(profile=profile, opts=opts, run_dir=rdir, scripts_dir=sdir, log_dir=sdir / "logs", exe=exe,
                  project_root=PROJECT_ROOT, frozen=frozen, secrets=required_secrets(profile),
                  hf_home=hf_home(opts, rdir))
    texts = {f"{j.key}.sbatch": env.get_template("job.sbatch.j2").render(job=j, **common) for j in jobs}
    texts["submit.sh"] = env.get_template("submit.sh.j2").render(jobs=jobs, **common)
    leaked = [(name, var) for name, text in texts.items() for var, value in secret_values().items() if value in text]
    if leaked:  # e.g. a token pasted into --setup: refuse rather than write it to a shared filesystem
        raise SlurmError("refusing to write secret values into job scripts: "
                         + ", ".join(f"{var} in {name}" for name, var in leaked))
    for name, text in texts.items():
        (sdir / name).write_text(text)
    (sdir / "submit.sh").chmod(0o755)
    est = estimate(profile, rdir, jobs)
    write_estimates(est, sdir)
    return {"scripts_dir": sdir, "run_dir": rdir, "jobs": jobs, "files": sorted(texts), "estimates": est}


def submit(scripts_dir: Path) -> str:
    """Run submit.sh (what the user would run by hand); its output lists the job ids."""
    if shutil.which("sbatch") is None:
        raise SlurmError(f"sbatch not found on PATH: this is not a SLURM login node. The scripts are written in "
                         f"{scripts_dir}; run `bash {scripts_dir}/submit.sh` where sbatch exists, or use --dry-run")
    proc = subprocess.run(["bash", str(Path(scripts_dir) / "submit.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"submit.sh failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------- helpers run inside the jobs

def select_gpus(start: int, count: int, visible: str | None) -> str:
    """GPUs by position in this node's CUDA_VISIBLE_DEVICES (SLURM may hand out e.g. '4,5,6,7')."""
    ids = [x for x in (visible or "").split(",") if x.strip()] or [str(i) for i in range(start + count)]
    if start + count > len(ids):
        raise SlurmError(f"asked for GPUs {start}..{start + count - 1} but only {len(ids)} are visible ({visible})")
    return ",".join(ids[start:start + count])


def with_machine_rank(cmd: list[str], rank: str) -> list[str]:
    """Insert ``--machine_rank`` into an ``accelerate launch`` command (its options precede the script)."""
    i = next((k for k, tok in enumerate(cmd) if tok in ("accelerate.commands.launch", "launch")), None)
    if i is None:
        raise SlurmError(f"not an accelerate launch command: {shlex.join(cmd)}")
    return cmd[:i + 1] + ["--machine_rank", rank] + cmd[i + 1:]


def main(argv: list[str] | None = None) -> int:
    """``gpus START COUNT [-- CMD]``: print or exec with those GPUs; ``node-rank -- CMD``: exec with this
    node's accelerate machine rank (the srun task id: one task per training node); ``fetch-models --profile P``:
    download the profile's Hub models and data sets into $HF_HOME (run where there is internet)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m autorule_lib.cluster.slurm")
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpus")
    g.add_argument("start", type=int)
    g.add_argument("count", type=int)
    g.add_argument("cmd", nargs=argparse.REMAINDER)
    r = sub.add_parser("node-rank")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    f = sub.add_parser("fetch-models", help="download the profile's Hub models and data sets into $HF_HOME")
    f.add_argument("--profile", required=True)
    a = p.parse_args(argv)
    if a.what == "fetch-models":
        got = fetch(load_profile(a.profile))
        print(f"fetched {len(got['models'])} models and {len(got['datasets'])} data sets into "
              f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}")
        return 0
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if a.what == "gpus":
        ids = select_gpus(a.start, a.count, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not cmd:
            print(ids)
            return 0
        os.environ["CUDA_VISIBLE_DEVICES"] = ids
    else:
        cmd = with_machine_rank(cmd, os.environ.get("SLURM_PROCID", "0"))
    if not cmd:
        p.error("a command is needed after --")
    os.execvp(cmd[0], cmd)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
