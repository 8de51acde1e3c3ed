"""The ``autorule`` command line: prepare-data, extract-rules, run, book, profile, slurm."""
from __future__ import annotations

import argparse
import json
import sys

from ..artifacts import CorruptFileError, MissingArtifactError, require
from ..config import ConfigError
from ..layout import DATA, RunLayout
from ..profiles import load_profile, run_dir
from ..data.preparation import SchemaError
from ..data.preparation import prepare_data
from ..smoke.build import build_models
from ..extraction.pipeline import ExtractionError, extract_rules_from_source, step_table, with_overrides
from ..extraction.sampling import uf_sample_pool
from .run_lock import RunLocked
from .runner import ChapterFailed, PrerequisitesMissing, RunDirError, RunInterrupted, run_book
from .html import build_book
from ..cluster.estimates import to_markdown
from ..cluster.slurm import TEMPLATES_DIR, Options, submit, write_jobs

USER_ERRORS = (ConfigError, SchemaError, MissingArtifactError, CorruptFileError, FileNotFoundError, KeyError,
               ValueError)
# clients that spend money (API calls) or GPU time: the profile they run under must be named, not defaulted
SPENDING_LLMS = ("bedrock", "openai", "local")
DEFAULT_PROFILE = "smoke"


def _cmd_prepare_data(args) -> int:
    profile = load_profile(args.profile)
    models_dir = RunLayout(run_dir(profile)).models
    if args.dataset == "ultrafeedback" and args.tokenizer is None:
        build_models(profile, models_dir)  # its length filter needs the tokenizer: smoke's is built locally
    report = prepare_data(profile, args.dataset, args.source, args.output_dir, tokenizer=args.tokenizer,
                          hf_username=args.hf_username, skip_bad_rows=args.skip_bad_rows or None,
                          models_dir=models_dir)
    for split, r in report.items():
        dropped = ", ".join(f"{k}={v}" for k, v in r["dropped"].items())
        print(f"{split}: {r['rows_in']} in, {r['rows_kept']} kept ({dropped})")
    print(f"wrote {args.output_dir}/report.json")
    return 0


def _cmd_extract_rules(args) -> int:
    if args.profile is None and args.llm in SPENDING_LLMS:
        print(f"error: extract-rules --llm {args.llm} spends money or GPU time: name the settings to use with "
              f"--profile (e.g. --profile paper)", file=sys.stderr)
        return 2
    profile = load_profile(args.profile or DEFAULT_PROFILE)
    cfg = with_overrides(profile.extraction, llm=args.llm, model=args.model, base_url=args.base_url,
                         num_proc=args.num_proc, uf_num_examples=args.uf_num_examples,
                         mt_num_examples_per_question=args.mt_num_examples_per_question)
    source, split = args.source, args.split
    if source is None and cfg.llm == "replay":
        # the recorded responses answer chapter 02's examples, which come from chapter 01's prepared sets
        if args.dataset_type == "uf":  # the pool chapter 02 draws from (unfiltered train_prefs by default)
            data_dir = require(RunLayout(run_dir(profile)).data("ultrafeedback"), DATA[:2])
            pool, pool_split = uf_sample_pool(profile, data_dir)
        else:
            pool = require(RunLayout(run_dir(profile)).data_sets("mt_bench"), DATA[:2])
            pool_split = "mt_train"
        source, split = str(pool), split or pool_split
    elif source is None:
        source = profile.data.ultrafeedback_source if args.dataset_type == "uf" else profile.data.mt_bench_source
    try:
        result = extract_rules_from_source(profile, args.dataset_type, source, args.output_dir, split=split,
                                           cfg=cfg, cache_path=args.cache)
    except ExtractionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in step_table(result.report):
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(f"{len(result.merged_rules)} rules (hash {result.rule_set_hash[:16]}) from "
          f"{result.report['examples_ok']}/{result.report['examples']} examples -> {args.output_dir}/merged_rules.json")
    return 0


def _cmd_run(args) -> int:
    profile = load_profile(args.profile)
    only = [x for item in (args.only or []) for x in item.split(",") if x]
    try:
        # papermill's per-cell bar helps at a terminal; in a log file or a SLURM log it is noise
        manifest = run_book(profile, only=only, output_dir=args.output_dir, force=args.force,
                            progress=sys.stderr.isatty())
    except ChapterFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except (RunDirError, RunLocked, PrerequisitesMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run finished: {run_dir(profile, args.output_dir)} ({len(manifest['stages'])} chapter(s) recorded)")
    return 0


def _cmd_book(args) -> int:
    profile = load_profile(args.profile)
    index = build_book(run_dir(profile, args.output_dir), profile=profile)
    print(f"book built: {index}")
    return 0


def _cmd_profile(args) -> int:
    profile = load_profile(args.profile)
    d = profile.to_dict()
    print(json.dumps({"hash": profile.hash(), **d}, indent=2))
    return 0


def _cmd_slurm(args) -> int:
    profile = load_profile(args.profile)
    opts = Options(partition=args.partition, cpu_partition=args.cpu_partition, account=args.account, nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, time=args.time, cpu_time=args.cpu_time,
                   cpus_per_gpu=args.cpus_per_gpu, policy_vllm_gpus=args.policy_vllm_gpus,
                   verifier_gpus=args.verifier_gpus, parallel_runs=args.parallel_runs, max_requeues=args.max_requeues,
                   setup=args.setup or [], sbatch_args=args.sbatch_arg or [], mem=args.mem,
                   mem_per_gpu=args.mem_per_gpu, cpu_mem=args.cpu_mem, hf_home=args.hf_home,
                   fetch_models=args.fetch_models,
                   only=[x for item in (args.only or []) for x in item.split(",") if x] or None)
    out = write_jobs(profile, opts, run_dir=args.run_dir, scripts_dir=args.output_dir,
                 templates_dir=args.templates or TEMPLATES_DIR)
    print(to_markdown(out["estimates"]))
    print(f"wrote {len(out['jobs'])} job scripts, submit.sh, estimates.md and estimates.json to {out['scripts_dir']}; "
          f"frozen profile and run dir: {out['run_dir']}")
    if args.dry_run:
        print(f"dry run: nothing submitted. Submit with: bash {out['scripts_dir'] / 'submit.sh'}")
        return 0
    print(submit(out["scripts_dir"]), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autorule", description="AutoRule Book: run the reproduction chapter by chapter.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("prepare-data", help="Prepare UltraFeedback or MT-Bench data (the method, book/method.md §1).")
    d.add_argument("--dataset", required=True, choices=["ultrafeedback", "mt_bench"])
    d.add_argument("--source", required=True, help="Hub id, save_to_disk folder, or folder of <split>.jsonl/.parquet")
    d.add_argument("--output-dir", "--output_dir", required=True)
    d.add_argument("--profile", default="smoke", help="profile name or YAML file (default: smoke)")
    d.add_argument("--tokenizer", help="tokenizer path or Hub id (default: the profile's policy tokenizer)")
    d.add_argument("--hf-username", "--hf_username", help="push the processed dataset to <user>/" "processed_...")
    d.add_argument("--skip-bad-rows", "--skip_bad_rows", action="store_true", help="skip and count malformed rows")
    d.set_defaults(func=_cmd_prepare_data)

    e = sub.add_parser("extract-rules", help="Explain, extract and merge rules with a reasoning model "
                       "(the method, book/method.md §2).")
    e.add_argument("--dataset_type", "--dataset-type", required=True, choices=["uf", "mt"])
    e.add_argument("--output_dir", "--output-dir", required=True)
    e.add_argument("--uf_num_examples", "--uf-num-examples", type=int, help="UF pairs to explain (paper: 256)")
    e.add_argument("--mt_num_examples_per_question", "--mt-num-examples-per-question", type=int,
                   help="MT-Bench judgments per training question (paper: 8)")
    e.add_argument("--num_proc", "--num-proc", type=int, help="concurrent calls (paper: 8)")
    e.add_argument("--llm", choices=["bedrock", "openai", "local", "replay"], help="client (default: the profile's)")
    e.add_argument("--base-url", "--base_url", help="OpenAI-compatible server URL (--llm openai)")
    e.add_argument("--model", help="model id for the chosen client")
    e.add_argument("--source", help="Hub id, save_to_disk folder, or folder of <split>.jsonl/.parquet "
                   "(default: the profile's; train_prefs is read for uf, human for mt; with the replay client "
                   "chapter 01's outputs, as chapter 02 uses: its UF pool (extraction.uf_sample_pool) / mt_train)")
    e.add_argument("--split", help="read this split instead (e.g. rm_train of prepared sets)")
    e.add_argument("--cache", help="response cache file (default: <output_dir>/llm_cache.sqlite)")
    e.add_argument("--profile", help="profile name or YAML file (default: smoke; required with --llm "
                   f"{'/'.join(SPENDING_LLMS)}, which spend money or GPU time)")
    e.set_defaults(func=_cmd_extract_rules)

    r = sub.add_parser("run", help="Execute the book's notebooks in order with papermill.")
    r.add_argument("--profile", default="smoke")
    r.add_argument("--only", action="append", help="chapters to run: numbers or names, comma-separated")
    r.add_argument("--output-dir", help="run directory (default: <runs_dir>/<profile name>)")
    r.add_argument("--force", action="store_true", help="re-run chapters whose inputs are unchanged")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("book", help="Build the HTML book from a run's executed notebooks.")
    b.add_argument("--profile", default="smoke")
    b.add_argument("--output-dir", help="run directory (default: <runs_dir>/<profile name>)")
    b.set_defaults(func=_cmd_book)

    s = sub.add_parser("profile", help="Validate a profile and print its resolved settings and hash.")
    s.add_argument("profile")
    s.set_defaults(func=_cmd_profile)

    c = sub.add_parser("slurm", help="Write (and submit) one SLURM job per chapter, chained, with estimates.")
    c.add_argument("--profile", required=True, help="profile name or YAML file (frozen into the run dir)")
    c.add_argument("--output-dir", help="where the job scripts go (default: <run dir>/slurm)")
    c.add_argument("--run-dir", help="run directory on a shared filesystem (default: <runs_dir>/<profile name>)")
    c.add_argument("--partition", help="partition of the GPU jobs (default: the cluster's)")
    c.add_argument("--cpu-partition", help="partition of the CPU-only jobs (default: --partition)")
    c.add_argument("--account", help="SLURM account to charge")
    c.add_argument("--nodes", type=int, default=1,
                   help="nodes per training job (04-06) without vLLM servers; every other job uses one")
    c.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's num_processes)")
    c.add_argument("--time", default="24:00:00", help="time limit of GPU jobs; longer chapters requeue and resume")
    c.add_argument("--cpu-time", default="04:00:00", help="time limit of CPU-only jobs")
    c.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per GPU (CPU jobs get this many)")
    c.add_argument("--policy-vllm-gpus", type=int,
                   help="GPUs for `trl vllm-serve` in GRPO jobs (default: 1 if a run uses vllm_mode server; 0: none)")
    c.add_argument("--verifier-gpus", type=int,
                   help="GPUs for the `vllm serve` verifier when the profile's verifier is a server on the job's node "
                        "(backend openai, api_base_url on localhost; default 4, the paper's)")
    c.add_argument("--parallel-runs", action="store_true",
                   help="one job per GRPO run and PPO, side by side, before the 06 notebook collects them")
    c.add_argument("--max-requeues", type=int, default=20, help="a job requeued more often than this fails")
    c.add_argument("--mem", help="memory of every job (--mem; '0': the whole node); overrides the two below")
    c.add_argument("--mem-per-gpu", default="96G", help="memory per GPU of GPU jobs (--mem-per-gpu)")
    c.add_argument("--cpu-mem", default="32G", help="memory of CPU-only jobs (--mem)")
    c.add_argument("--hf-home", help="shared Hugging Face cache every job exports (default: $HF_HOME, else "
                   "<run dir>/hf_home)")
    c.add_argument("--fetch-models", choices=["job", "done", "off"], default="job",
                   help="job: a first job downloads the profile's models and data sets into --hf-home and the "
                        "others run offline; done: you ran `python -m autorule_lib.cluster.slurm fetch-models`; off: "
                        "every job downloads what it needs")
    c.add_argument("--setup", action="append", help="shell line run first in every job (repeatable), "
                   "e.g. 'module load cuda/12.4'")
    c.add_argument("--sbatch-arg", action="append", help="extra #SBATCH option (repeatable), e.g. --sbatch-arg=--qos=high")
    c.add_argument("--only", action="append", help="chapters to submit: numbers or names, comma-separated")
    c.add_argument("--templates", help="folder with edited job.sbatch.j2/submit.sh.j2 (default: configs/slurm)")
    c.add_argument("--dry-run", action="store_true", help="write the scripts and estimates, submit nothing")
    c.set_defaults(func=_cmd_slurm)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a file where a folder should be: one line naming the path
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
