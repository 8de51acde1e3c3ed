"""`autorule slurm`: rendered job scripts (1 and 2 nodes), their chain, resources, environment and commands,
the estimates, the in-job helpers, and one rendered job run here on the smoke profile."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from autorule_lib.cluster import slurm
from autorule_lib.train import launch
from autorule_lib.book.cli import build_parser, main as cli_main
from autorule_lib.config import PROJECT_ROOT
from autorule_lib.layout import Run
from autorule_lib.profiles import load_profile
from autorule_lib.cluster.slurm import Options, SlurmError, write_jobs

BOOK = ["00_overview", "01_data_preparation", "02_rule_extraction", "03_rule_agreement", "04_sft",
        "05_reward_model", "06_grpo", "07_evaluation", "08_reward_hacking", "09_results"]
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtokenVALUE_0123456789", "OPENAI_API_KEY": "sk-FAKEopenaiVALUE-abcdef",
                "AWS_SECRET_ACCESS_KEY": "FAKEawsSECRETvalue/xyz987", "MY_SERVICE_PASSWORD": "hunter2-FAKE-pw"}


def server_profile(tmp_path, runs="[autorule_uf, autorule_mt]"):
    """The paper with both servers: TRL's vllm-serve for rollouts, an OpenAI-compatible verifier on the node."""
    path = tmp_path / "server.yaml"
    path.write_text("extends: paper\nname: server\ngrpo: {use_vllm: true, vllm_mode: server}\n"
                    "verifier: {backend: openai, api_base_url: 'http://127.0.0.1:8100/v1'}\n"
                    + (f"grpo_runs: {runs}\n" if runs else ""))
    return str(path)


def two_node_profile(tmp_path):
    """The paper's AutoRule runs (micro-batch 4): on 16 training processes the baselines' micro-batch 16
    (the original's) would exceed their batch of 128, which the launcher rightly rejects."""
    path = tmp_path / "two_node.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("extends: paper\nname: two_node\ngrpo_runs: [autorule_uf, autorule_mt]\n")
    return str(path)


def rendered(tmp_path, profile="paper", stages=BOOK, **opts):
    out = write_jobs(load_profile(profile), Options(**opts), run_dir=tmp_path / "run", scripts_dir=tmp_path / "slurm",
                     chapters=stages)
    return out, {p.name: p.read_text() for p in (tmp_path / "slurm").iterdir() if p.is_file()}


def sbatch_opts(text):
    return dict(re.match(r"#SBATCH --([\w-]+)=?(.*)", line).groups() for line in text.splitlines()
                if line.startswith("#SBATCH --"))


def exported(text, name):
    m = re.findall(rf"^export {name}=(.*)$", text, re.M)
    return m[-1] if m else None


def main_command(text):
    (line,) = [x for x in text.splitlines() if x.startswith("run_requeueable ")]
    return shlex.split(line)[1:]


def submitted_chain(submit_sh):
    """{key: dependency string} from submit.sh's `submit KEY "DEP"` lines."""
    return {k: d for k, d in re.findall(r'=\$\(submit (\S+) "([^"]*)"\)', submit_sh)}


# ---------------------------------------------------------------- rendering

def test_one_node_chain_and_resources(tmp_path):
    out, files = rendered(tmp_path)
    keys = [j.key for j in out["jobs"]]
    assert keys == [slurm.FETCH_JOB] + BOOK + ["99_book"] and {f"{k}.sbatch" for k in keys} <= set(files)
    chain = submitted_chain(files["submit.sh"])
    assert list(chain) == keys  # submission order = plan order: every id exists before it is referenced
    assert chain[slurm.FETCH_JOB] == ""  # models and data first, into the shared HF_HOME
    for prev, key in zip(keys, keys[1:-1]):
        assert chain[key] == f"afterok:$j_{prev}"
    assert chain["99_book"] == "afterany:$j_09_results"  # the book is built even after a failure
    assert "--kill-on-invalid-dep=yes" in files["submit.sh"] and "sbatch --parsable" in files["submit.sh"]

    for key in keys:
        o = sbatch_opts(files[f"{key}.sbatch"])
        assert o["nodes"] == "1" and "requeue" in o and o["signal"] == "B:USR1@600" and o["export"] == "ALL"
        assert o["open-mode"] == "append"
    cpu = sbatch_opts(files["00_overview.sbatch"])
    assert "gres" not in cpu and cpu["time"] == "04:00:00" and cpu["cpus-per-task"] == "8"
    for key in ("04_sft", "05_reward_model", "06_grpo"):
        text = files[f"{key}.sbatch"]
        assert sbatch_opts(text)["gres"] == "gpu:8" and sbatch_opts(text)["time"] == "24:00:00"
        assert exported(text, "AUTORULE_NUM_MACHINES") is None
    assert exported(files["04_sft.sbatch"], "AUTORULE_NUM_PROCESSES") == "8"
    # the paper's verifier is one vLLM server on GPUs 0-3 of the jobs that judge (03, 06, 08), not an
    # engine per training rank: GRPO trains on the other 4 GPUs
    assert sorted(k for k, text in files.items() if "start_service verifier-vllm 0 4 " in text) == \
        ["03_rule_agreement.sbatch", "06_grpo.sbatch", "08_reward_hacking.sbatch"]
    assert exported(files["06_grpo.sbatch"], "AUTORULE_NUM_PROCESSES") == "4"
    assert sbatch_opts(files["03_rule_agreement.sbatch"])["gres"] == "gpu:5"


def test_one_node_with_vllm_servers(tmp_path):
    _, files = rendered(tmp_path, profile=server_profile(tmp_path), verifier_gpus=3)
    grpo = files["06_grpo.sbatch"]
    starts = re.findall(r"^start_service (\S+) (\d+) (\d+) (\S+) ", grpo, re.M)
    assert starts == [("policy-vllm", "0", "1", "http://127.0.0.1:8000/health"),
                      ("verifier-vllm", "1", "3", "http://127.0.0.1:8100/health")]
    assert "gpus 4 4)" in grpo and exported(grpo, "AUTORULE_NUM_PROCESSES") == "4"  # the 4 GPUs after the servers
    assert grpo.index("wait_ready\n") < grpo.index("run_requeueable /")  # servers answer before the stage starts
    agreement = files["03_rule_agreement.sbatch"]  # the verifier server + the notebook's own GPU
    assert sbatch_opts(agreement)["gres"] == "gpu:4" and "gpus 3 1)" in agreement
    assert "policy-vllm" not in agreement and "start_service" not in files["07_evaluation.sbatch"]


def test_two_nodes(tmp_path):
    out, files = rendered(tmp_path, nodes=2, gpus_per_node=8, partition="gpu", cpu_partition="cpu",
                          account="proj", sbatch_args=["--qos=high"])
    # the paper's verifier server is reached at localhost: its GRPO job stays on one node (see below)
    assert sbatch_opts(files["06_grpo.sbatch"])["nodes"] == "1"
    for key in ("04_sft", "05_reward_model"):
        text = files[f"{key}.sbatch"]
        o = sbatch_opts(text)
        assert (o["nodes"], o["gres"], o["partition"], o["account"], o["qos"]) == ("2", "gpu:8", "gpu", "proj", "high")
        assert exported(text, "AUTORULE_NUM_PROCESSES") == "16" and exported(text, "AUTORULE_NUM_MACHINES") == "2"
        assert exported(text, "AUTORULE_NODE_LAUNCHER").startswith('"srun --nodes=2 --ntasks-per-node=1 --gres=gpu:8')
        assert exported(text, "AUTORULE_MAIN_PROCESS_IP") == '"$MAIN_HOST"'
    for key in ("00_overview", "03_rule_agreement", "07_evaluation", "99_book"):  # only training spans nodes
        assert sbatch_opts(files[f"{key}.sbatch"])["nodes"] == "1"
    assert sbatch_opts(files["00_overview.sbatch"])["partition"] == "cpu"
    # servers are addressed as localhost: a GRPO job with servers stays on one node, SFT still uses two
    _, files = rendered(tmp_path / "servers", profile=server_profile(tmp_path), nodes=2, verifier_gpus=3)
    assert sbatch_opts(files["06_grpo.sbatch"])["nodes"] == "1"
    assert "AUTORULE_NODE_LAUNCHER" not in files["06_grpo.sbatch"]
    assert sbatch_opts(files["04_sft.sbatch"])["nodes"] == "2"


def test_parallel_runs_fan_out_and_join(tmp_path):
    profile = load_profile("paper")
    out, files = rendered(tmp_path, parallel_runs=True)
    chain = submitted_chain(files["submit.sh"])
    runs = [f"06_grpo.{n}" for n in profile.grpo_run_names()] + ["06_grpo.ppo"]
    for key in runs:
        assert chain[key] == "afterok:$j_05_reward_model"
    assert chain["06_grpo"] == "afterok:" + ":".join(f"$j_{k.replace('.', '_')}" for k in runs)
    assert chain["07_evaluation"] == "afterok:$j_06_grpo"
    assert exported(files["06_grpo.autorule_uf.sbatch"], "AUTORULE_NUM_PROCESSES") == "4"  # 4 GPUs serve the verifier
    assert exported(files["06_grpo.rm_only.sbatch"], "AUTORULE_NUM_PROCESSES") == "8"  # no verifier: all 8 train
    collector = files["06_grpo.sbatch"]  # only reads finished runs: one process, one GPU
    assert exported(collector, "AUTORULE_NUM_PROCESSES") == "1" and sbatch_opts(collector)["gres"] == "gpu:1"
    # with servers, each run gets only those it needs: an RM-only run starts no verifier
    _, files = rendered(tmp_path / "s", profile=server_profile(tmp_path, runs="[autorule_uf, rm_only]"),
                        parallel_runs=True, verifier_gpus=3, policy_vllm_gpus=4)
    assert "verifier-vllm" in files["06_grpo.autorule_uf.sbatch"]
    assert "verifier-vllm" not in files["06_grpo.rm_only.sbatch"]
    assert exported(files["06_grpo.rm_only.sbatch"], "AUTORULE_NUM_PROCESSES") == "4"
    assert exported(files["06_grpo.autorule_uf.sbatch"], "AUTORULE_NUM_PROCESSES") == "1"


def test_every_command_exists_in_our_cli_and_trl(tmp_path):
    from trl.scripts.vllm_serve import make_parser

    # the AutoRule runs only: an RM-only run would leave 7 trainers, which 128 does not divide into
    _, files = rendered(tmp_path, profile=server_profile(tmp_path), parallel_runs=True, verifier_gpus=3)
    seen = set()
    for name, text in files.items():
        if not name.endswith(".sbatch"):
            continue
        argv = main_command(text)
        if argv[0].endswith("/autorule"):
            args = build_parser().parse_args(argv[1:])  # SystemExit (a test failure) if it is not our CLI
            seen.add(args.command)
            assert args.profile == str(tmp_path / "run" / "profile.yaml")
            assert args.output_dir == str(tmp_path / "run")
            if args.command == "run":
                assert args.only == [name.split(".")[0]]
        elif argv[1:3] == ["-m", "autorule_lib.cluster.slurm"]:
            assert argv[3:] == ["fetch-models", "--profile", str(tmp_path / "run" / "profile.yaml")]
            seen.add("fetch-models")
        else:
            assert argv[1:3] == ["-m", "autorule_lib.train.launch"]
            a = launch.build_parser().parse_args(argv[3:])
            assert a.launch and a.stage in ("grpo", "ppo")
        for line in re.findall(r"^start_service (.*)$", text, re.M):
            cmd = shlex.split(line)[4:]
            if cmd[1] == "vllm-serve":
                script_args, rest = make_parser().parse_args_and_config(args=cmd[2:], return_remaining_strings=True)
                assert rest == [] and script_args.port == slurm.POLICY_VLLM_PORT
                assert script_args.model == str(tmp_path / "run/artifacts/04_sft/model")
            else:  # vLLM is not installed here: check the command's shape against vllm serve's documented flags
                assert cmd[1:3] == ["serve", "meta-llama/Meta-Llama-3-8B-Instruct"]
                flags = {f: cmd[i + 1] for i, f in enumerate(cmd[:-1]) if f.startswith("--")}
                assert "--enable-prefix-caching" in cmd and flags["--port"] == "8100"
                assert flags["--data-parallel-size"] == "3"
                assert flags["--served-model-name"] == "meta-llama/Meta-Llama-3-8B-Instruct"  # the name it is sent
    assert seen == {"run", "book", "fetch-models"}


def test_scripts_are_valid_bash(tmp_path):
    variants = [{}, {"profile": two_node_profile(tmp_path), "nodes": 2, "parallel_runs": True},
                {"profile": server_profile(tmp_path), "verifier_gpus": 3, "nodes": 2}]
    for i, opts in enumerate(variants):
        _, files = rendered(tmp_path / str(i), **opts)
        for name in files:
            if name.endswith((".sbatch", ".sh")):
                proc = subprocess.run(["bash", "-n", str(tmp_path / str(i) / "slurm" / name)], capture_output=True,
                                      text=True)
                assert proc.returncode == 0, (name, proc.stderr)


def test_no_secret_values_in_scripts(tmp_path, monkeypatch):
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    rendered(tmp_path, profile=two_node_profile(tmp_path / "p"), nodes=2, parallel_runs=True)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    for p in written:
        text = p.read_text()
        assert not [k for k, v in FAKE_SECRETS.items() if v in text], p
    grpo = (tmp_path / "slurm/06_grpo.autorule_uf.sbatch").read_text()
    assert "for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY HF_TOKEN OPENAI_API_KEY; do" in grpo  # names only
    # a value that would end up in a script (here through --setup) is refused, not written
    with pytest.raises(SlurmError, match="HF_TOKEN"):
        rendered(tmp_path / "again", setup=[f"export HF_TOKEN={FAKE_SECRETS['HF_TOKEN']}"])
    assert not (tmp_path / "again/slurm/04_sft.sbatch").exists()


def test_impossible_allocations_fail_before_writing(tmp_path):
    servers = server_profile(tmp_path)
    # 1 policy + 4 verifier GPUs leave 3 trainers: 128 is not a multiple of 4 x 3
    with pytest.raises(SlurmError, match=r"grpo_variants\.autorule_uf batch 128 .* x 3 training processes"):
        rendered(tmp_path / "a", profile=servers)
    with pytest.raises(SlurmError, match="leave none for training") as err:
        rendered(tmp_path / "b", profile=servers, gpus_per_node=4)
    assert "03_rule_agreement: its vLLM servers and the notebook need 5 GPUs, a node has 4" in str(err.value)
    in_process = tmp_path / "in_process.yaml"
    in_process.write_text("extends: paper\nverifier: {backend: vllm}\n")
    with pytest.raises(SlurmError, match="not a server on the job's node"):
        rendered(tmp_path / "c", profile=str(in_process), verifier_gpus=2)  # an in-process verifier engine
    assert not [d for d in "abc" if (tmp_path / d / "slurm").exists()]


def test_memory_is_requested_explicitly(tmp_path):
    _, files = rendered(tmp_path)
    assert sbatch_opts(files["04_sft.sbatch"])["mem-per-gpu"] == "96G"
    assert "mem" not in sbatch_opts(files["04_sft.sbatch"])
    assert sbatch_opts(files["00_overview.sbatch"])["mem"] == "32G"
    assert "mem-per-gpu" not in sbatch_opts(files["00_overview.sbatch"])
    _, files = rendered(tmp_path / "whole", mem="0", mem_per_gpu="200G")
    for name in ("00_overview.sbatch", "06_grpo.sbatch", "99_book.sbatch"):
        o = sbatch_opts(files[name])
        assert o["mem"] == "0" and "mem-per-gpu" not in o  # SLURM refuses --mem together with --mem-per-gpu


def test_shared_hf_home_fetched_once_then_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    _, files = rendered(tmp_path)
    home = str(tmp_path / "run" / "hf_home")
    for name, text in files.items():
        if name.endswith(".sbatch"):
            assert exported(text, "HF_HOME") == home, name
    fetch = files[f"{slurm.FETCH_JOB}.sbatch"]
    assert "HF_HUB_OFFLINE" not in fetch and "gres" not in sbatch_opts(fetch)
    assert "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in files["06_grpo.sbatch"]
    # alpaca_eval (chapter 07, alpaca_eval: run) reads its data from the Hub at run time
    assert "HF_HUB_OFFLINE" not in files["07_evaluation.sbatch"]
    _, files = rendered(tmp_path / "done", hf_home="/shared/hf", fetch_models="done")
    assert f"{slurm.FETCH_JOB}.sbatch" not in files
    assert exported(files["04_sft.sbatch"], "HF_HOME") == "/shared/hf"
    assert "HF_HUB_OFFLINE=1" in files["04_sft.sbatch"]
    _, files = rendered(tmp_path / "off", fetch_models="off")
    assert "HF_HUB_OFFLINE" not in files["04_sft.sbatch"] and f"{slurm.FETCH_JOB}.sbatch" not in files
    monkeypatch.setenv("HF_HOME", "/site/hf-cache")
    _, files = rendered(tmp_path / "env")
    assert exported(files["04_sft.sbatch"], "HF_HOME") == "/site/hf-cache"


def test_fetch_targets_and_fetch_with_fakes():
    paper = load_profile("paper")
    t = slurm.fetch_targets(paper)
    assert t == {"models": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"],
                 "datasets": ["HuggingFaceH4/ultrafeedback_binarized", "lmsys/mt_bench_human_judgments"]}
    single = slurm.fetch_targets(load_profile("single_gpu"))
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in single["models"]  # the local extractor
    assert "Qwen/Qwen2.5-1.5B-Instruct" in single["models"]
    assert slurm.fetch_targets(load_profile("smoke")) == {"models": [], "datasets": []}  # all local
    got = []
    slurm.fetch(paper, snapshot_download=lambda repo, allow_patterns: got.append(("model", repo, allow_patterns)),
                load_dataset=lambda repo: got.append(("data", repo)))
    assert [g[:2] for g in got] == [("model", t["models"][0]), ("model", t["models"][1]),
                                    ("data", t["datasets"][0]), ("data", t["datasets"][1])]
    assert "*.safetensors" in got[0][2] and "*.bin" not in got[0][2]


def test_fetch_models_command_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "autorule_lib.cluster.slurm", "fetch-models", "--profile", "smoke"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, env={**os.environ, "HF_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"fetched 0 models and 0 data sets into {tmp_path}" in proc.stdout


def test_loopback_is_never_proxied(tmp_path, monkeypatch):
    _, files = rendered(tmp_path, profile=server_profile(tmp_path), verifier_gpus=3)
    grpo = files["06_grpo.sbatch"]
    assert grpo.index("export no_proxy=") < grpo.index("start_service ")  # before the first health check
    env = {"PATH": os.environ["PATH"], "no_proxy": "corp.example"}
    line = [x for x in grpo.splitlines() if x.startswith("export no_proxy=")][0]
    out = subprocess.run(["bash", "-c", f"{line}; export NO_PROXY=\"$no_proxy\"; echo $no_proxy; echo $NO_PROXY"],
                         env=env, capture_output=True, text=True).stdout.split()
    assert out == ["127.0.0.1,localhost,corp.example"] * 2
    import urllib.request
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("no_proxy", out[0])  # the health check's urllib then goes direct
    assert urllib.request.proxy_bypass("127.0.0.1") and urllib.request.proxy_bypass("localhost")


def test_cli_memory_and_fetch_options(tmp_path):
    args = build_parser().parse_args(["slurm", "--profile", "paper", "--mem-per-gpu", "120G", "--cpu-mem", "8G",
                                      "--hf-home", "/shared/hf", "--fetch-models", "done"])
    assert (args.mem, args.mem_per_gpu, args.cpu_mem, args.hf_home, args.fetch_models) == \
        (None, "120G", "8G", "/shared/hf", "done")


# ---------------------------------------------------------------- estimates

def test_estimates_count_verifier_calls_from_the_profile_and_the_run(tmp_path):
    profile = load_profile("paper")
    out, files = rendered(tmp_path, stages=["04_sft", "05_reward_model", "06_grpo"], parallel_runs=True)
    est = json.loads(files["estimates.json"])
    rows = {r["job"]: r for r in est["jobs"]}
    v = profile.grpo_variant("autorule_uf")
    rollouts = -(-33_000 // v.prompts_per_rollout)  # the assumed ~33k filtered prompts
    assert rows["06_grpo.autorule_uf"]["verifier_calls"] == rollouts * 1024 * 2 * 25
    assert rows["06_grpo.autorule_mt"]["verifier_calls"] == rollouts * 1024 * 2 * 20
    assert rows["06_grpo.rm_only"]["verifier_calls"] == 0 and rows["06_grpo.rm_only"]["gpu_hours"] > 0
    assert rows["06_grpo.autorule_uf"]["gpu_hours"] > rows["06_grpo.rm_only"]["gpu_hours"]
    assert "Assumptions" in files["estimates.md"] and "| 06_grpo.autorule_uf |" in files["estimates.md"]

    # what the run already knows replaces the defaults: stage 01's set sizes, stage 02's rule count
    art = tmp_path / "run/artifacts"
    (art / "01_data_preparation/ultrafeedback").mkdir(parents=True)
    (art / "01_data_preparation/ultrafeedback/provenance.json").write_text(json.dumps({"set_sizes": {"rl_prompts": 2048}}))
    (art / "02_rule_extraction/uf").mkdir(parents=True)
    (art / "02_rule_extraction/uf/merged_rules.json").write_text(json.dumps(["r1", "r2", "r3"]))
    out, files = rendered(tmp_path, stages=["06_grpo"])
    est = json.loads(files["estimates.json"])
    assert est["rules"]["uf"] == {"count": 3, "from": "extracted"} and est["rules"]["mt"]["from"] == "paper"
    calls_uf_runs = 2 * 1024 * 2 * 3 + 4 * 1024 * 2 * 3  # autorule_uf (1 episode) + autorule_uf_2ep (2 episodes)
    calls_mt = 2 * 1024 * 2 * 20
    (grpo_row,) = [r for r in est["jobs"] if r["job"] == "06_grpo"]
    assert grpo_row["verifier_calls"] == calls_uf_runs + calls_mt


# ---------------------------------------------------------------- helpers used inside the jobs

def test_accelerate_command_one_node_unchanged_and_multi_node(tmp_path):
    profile = load_profile("paper")
    one = launch.accelerate_command("sft", Run.at(profile, tmp_path), environ={})
    assert one == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "8", "--config_file",
                   profile.accelerate_config, "-m", "autorule_lib.train.launch", "sft", "--profile",
                   str(tmp_path / "profile.yaml"), "--run-dir", str(tmp_path)]
    env = {"AUTORULE_NUM_PROCESSES": "16", "AUTORULE_NUM_MACHINES": "2", "AUTORULE_MAIN_PROCESS_IP": "node01",
           "AUTORULE_MAIN_PROCESS_PORT": "29642", "AUTORULE_NODE_LAUNCHER": "srun --nodes=2 --ntasks-per-node=1"}
    multi = launch.accelerate_command("grpo", Run.at(profile, tmp_path), variant="autorule_uf", environ=env)
    assert multi[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable]
    assert multi[4:8] == ["-m", "autorule_lib.cluster.slurm", "node-rank", "--"]
    accelerate_args = multi[8:]
    for flag, value in [("--num_processes", "16"), ("--num_machines", "2"), ("--main_process_ip", "node01"),
                        ("--main_process_port", "29642")]:
        assert accelerate_args[accelerate_args.index(flag) + 1] == value
    assert accelerate_args.index("--num_machines") < accelerate_args.index("-m", 2)  # launcher options precede the module
    assert slurm.with_machine_rank(accelerate_args, "1")[3:5] == ["--machine_rank", "1"]
    # loaded from the run dir's frozen profile (as in every cluster job): that shared file is not rewritten
    frozen = load_profile(tmp_path / "profile.yaml")
    before = (tmp_path / "profile.yaml").stat().st_mtime_ns
    time.sleep(0.01)
    launch.accelerate_command("sft", Run.at(frozen, tmp_path), environ={})
    assert (tmp_path / "profile.yaml").stat().st_mtime_ns == before


def test_gpu_selection_by_position(tmp_path):
    assert slurm.select_gpus(1, 2, "4,5,6,7") == "5,6"
    assert slurm.select_gpus(0, 3, None) == "0,1,2"
    with pytest.raises(SlurmError):
        slurm.select_gpus(3, 2, "0,1,2,3")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    proc = subprocess.run([sys.executable, "-m", "autorule_lib.cluster.slurm", "gpus", "2", "2", "--", sys.executable, "-c",
                           "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"], env=env, capture_output=True,
                          text=True, cwd=PROJECT_ROOT)
    assert proc.stdout.strip() == "6,7", proc.stderr


def _job_script(tmp_path, command):
    """The smoke profile's rendered 00 job with its stage command replaced: exercises the script's own logic."""
    _, files = rendered(tmp_path, profile="smoke", stages=["00_overview"])
    text = re.sub(r"^run_requeueable .*$", f"run_requeueable {command}", files["00_overview.sbatch"], flags=re.M)
    path = tmp_path / "job.sh"
    path.write_text(text)
    return path


def _fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / name).write_text(f"#!/bin/bash\n{body}\n")
    (d / name).chmod(0o755)
    return d


def test_time_limit_signal_requeues_and_the_stage_keeps_running(tmp_path):
    log = tmp_path / "scontrol.log"
    bindir = _fake_bin(tmp_path, "scontrol", f'echo "$@" >> {log}')
    script = _job_script(tmp_path, f"bash -c 'sleep 2; touch {tmp_path}/stage-done'")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends before the time limit
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert log.read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "stage-done").exists()  # the trap did not cut the stage short

    failing = _job_script(tmp_path / "f", "bash -c 'exit 3'")
    assert subprocess.run(["bash", str(failing)], env=env, capture_output=True).returncode == 3
    over = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "21"}, capture_output=True,
                          text=True)
    assert over.returncode == 1 and "requeued 21 times" in over.stderr


def test_rendered_smoke_stage_command_runs_here(tmp_path):
    """The whole rendered 00 job script, run with bash as SLURM would (its setup, checks and stage command)."""
    _, files = rendered(tmp_path, profile="smoke", stages=["00_overview", "01_data_preparation"])
    argv = main_command(files["00_overview.sbatch"])
    assert argv[1:] == ["run", "--profile", str(tmp_path / "run/profile.yaml"), "--only", "00_overview",
                        "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(["bash", str(tmp_path / "slurm/00_overview.sbatch")], capture_output=True, text=True,
                          env={**os.environ, "SLURM_JOB_ID": "77"}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["stages"]["00_overview"]["status"] == "ok"
    assert manifest["profile_hash"] == load_profile("smoke").hash()  # the frozen profile is the same profile
    assert (tmp_path / "run/notebooks/00_overview.ipynb").exists()


def test_cli_submits_through_sbatch_or_explains(tmp_path, monkeypatch, capsys):
    log = tmp_path / "sbatch.log"
    bindir = _fake_bin(tmp_path, "sbatch", f'n=$(( $(cat {log} 2>/dev/null | wc -l) + 100 ))\n'
                                           f'echo "$@" >> {log}\necho "$n;cluster1"')
    args = ["slurm", "--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--output-dir", str(tmp_path / "s"),
            "--only", "00,01"]
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert cli_main(args) == 0
    calls = log.read_text().splitlines()
    assert [c.split()[-1] for c in calls] == ["00_overview.sbatch", "01_data_preparation.sbatch", "99_book.sbatch"]
    assert "--dependency" not in calls[0]
    assert "--dependency=afterok:100 " in calls[1] and "--dependency=afterany:101 " in calls[2]  # ';cluster' cut
    assert (tmp_path / "s/job_ids.txt").read_text().split() == ["00_overview", "100", "01_data_preparation", "101",
                                                                "99_book", "102"]
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli_main(args) == 2
    assert "sbatch not found" in capsys.readouterr().err
    assert cli_main(args + ["--dry-run"]) == 0
