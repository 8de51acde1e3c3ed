"""One-shot GPU check (issue 12): every CUDA check the project needs, in one command, in ~8 minutes on one H200.

Nothing in the project had run on CUDA, and a GPU machine is lent only now and then, for minutes, with no
network. This script is everything to run there, in order, each part guarded (a failure is recorded with
its error and the next part still runs):

  cuda_correctness    shared-prefix attention on its non-CPU path (plain matmul/log-sum-exp merge, the path
                      every non-CPU device takes) against whole-sequence logits, in fp32 and bf16; and the
                      fast verifier's verdicts against parity generation on the smoke profile's tiny judge
  training_stages     the smoke profile's SFT, reward model (with mu/sigma) and GRPO ``autorule_uf`` in bf16 on
                      the device, one process, through ``autorule_lib.train.launch.run_stage`` as the book
  verifier_benchmark  ``benchmarks/verifier_throughput.py --model llama8b-random``: fast vs parity at K = 25,
                      conversations lengthened to ~800 tokens (judge prompts of ~1k tokens)
  grpo_breakdown      GRPO steps (``autorule_lib.train.grpo.train_grpo``) of a Llama-3.2-1B-shaped random policy
                      with the rule reward at K = 25 (a 1B-shaped random judge, fast mode) and a 1B-shaped
                      random RM: generation, verification, RM scoring and optimizer step as shares of a step

Everything it needs is built here from the repository (fixtures, tiny model builders, random weights).
``--device cpu --quick`` is the CPU rehearsal: every part at tiny shapes through the same code; the test
suite runs it (tests/test_gpu_check.py). One line per part, then ``gpu_check: <n> passed, <m> failed``;
the results (machine, versions, every figure) go to ``--out`` (default benchmarks/results/gpu_check.md).
How to start it on the GPU machine in one call: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]  # autorule_lib: installed here, on PYTHONPATH there (gpu_check.sh)

# Stated tolerances of the attention check: max |packed - whole| / max |whole| over all read-out logits.
TOLERANCE = {"fp32": 2e-4, "bf16": 4e-2}
MIN_AGREEMENT = 0.99  # fast vs parity verdicts on the trained tiny judge (CPU: 200/200 identical)


class PartFailed(AssertionError):
    """A part's check did not hold (as opposed to a crash)."""


@dataclasses.dataclass
class Part:
    name: str
    ok: bool
    seconds: float
    summary: str
    figures: dict
    error: str = ""


@dataclasses.dataclass
class Context:
    device: str
    quick: bool
    work: Path
    inject_failure: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def models_dir(self) -> Path:
        return self.work / "run" / "models"

    def profile(self):
        """The smoke profile on this device, in bf16 on a GPU as a GPU profile would run it."""
        from autorule_lib.profiles import load_profile

        p = load_profile("smoke")
        # bf16 on the GPU; the CPU rehearsal keeps fp32, where bf16 matrix products are only slow
        p.device, p.precision = self.device, "bf16" if self.device == "cuda" else "fp32"
        if self.quick:  # the rehearsal: fewer steps, the same calls
            p.sft = dataclasses.replace(p.sft, max_steps=2, save_steps=2)
            p.reward_model = dataclasses.replace(p.reward_model, max_steps=2, save_steps=2)
            p.grpo = dataclasses.replace(p.grpo, max_steps=1)
        return p

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------- guard and report

def run_part(name: str, fn, ctx: Context) -> Part:
    """Run one part; any exception is recorded as its failure, and the caller goes on."""
    import torch

    t0 = time.perf_counter()
    try:
        if ctx.inject_failure == name:
            raise RuntimeError(f"failure injected into {name} (--inject-failure)")
        summary, figures = fn(ctx)
        part = Part(name, True, time.perf_counter() - t0, summary, figures)
    except Exception as e:  # the point: record it, run the next part
        tb = traceback.format_exc(limit=6)
        part = Part(name, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}".splitlines()[0][:300], {},
                    tb)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"[{'PASS' if part.ok else 'FAIL'}] {name} ({part.seconds:.1f} s): {part.summary}", flush=True)
    if not part.ok:
        print(part.error, file=sys.stderr, flush=True)
    return part


def machine() -> dict:
    import importlib.metadata as md

    import torch

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    gpu = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "pyarrow", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    try:  # the GPU machine gets a copy of the working tree, maybe without git or .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"host": f"{platform.system()} {platform.release()}; CPU {cpu}, {os.cpu_count()} logical cores",
            "gpu": gpu, "cuda": torch.version.cuda or "none", "python": platform.python_version(),
            "versions": versions, "commit": commit or "unknown (no git there)"}


def write_report(path: Path, parts: list[Part], ctx: Context, info: dict, total_s: float) -> None:
    passed = sum(p.ok for p in parts)
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             f"Written by `benchmarks/gpu_check.py --device {ctx.device}{' --quick' if ctx.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {total_s:.0f} s in all. "
             + ("**CPU rehearsal at tiny shapes: its figures say nothing about a GPU.**" if ctx.device == "cpu"
                else ""), "",
             f"- machine: {info['host']}; GPU {info['gpu']}; CUDA {info['cuda']}; Python {info['python']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
             f"- code: commit {info['commit']}", "",
             f"**gpu_check: {passed} passed, {len(parts) - passed} failed**", "",
             "| part | result | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {'pass' if p.ok else 'FAIL'} | {p.seconds:.1f} | {p.summary.replace('|', '/')} |"
              for p in parts]
    for p in parts:
        lines += ["", f"## {p.name}", ""]
        if p.ok:
            lines += [f"- {k}: {v}" for k, v in p.figures.items()]
        else:
            lines += ["```", p.error.strip(), "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- shared inputs

def prepared_run(ctx: Context):
    """The run directory's chapter-01 sets and chapter-02 rule set, built once from the fixtures."""
    from autorule_lib.artifacts import provenance, write_json
    from autorule_lib.data.preparation import prepare_data
    from autorule_lib.layout import RunLayout
    from autorule_lib.smoke.build import build_models
    from verifier_throughput import RULES

    profile = ctx.profile()
    build_models(profile, ctx.models_dir)  # the method finds the tiny models through the registry this writes
    data = RunLayout(ctx.run_dir).data("ultrafeedback")
    if not (data / "sets").exists():
        prepare_data(profile, "ultrafeedback", profile.data.ultrafeedback_source, data, models_dir=ctx.models_dir)
    rules = RunLayout(ctx.run_dir).rules("uf")
    if not rules.exists():
        # Extraction is no GPU concern: the GRPO run gets the benchmark's 25 rules (K = 25, the paper's UF count).
        rules.parent.mkdir(parents=True, exist_ok=True)
        rules.write_text(json.dumps(RULES, indent=1))
        write_json(rules.parent / "provenance.json", provenance(profile, "gpu_check/rules", source="benchmark RULES"))
    return profile


@contextlib.contextmanager
def non_cpu_attention_path():
    """On a CPU, make shared-prefix attention take the path every other device takes (no fused CPU kernel)."""
    from autorule_lib.verify import shared_prefix

    saved = shared_prefix._CPU_FUSED
    shared_prefix._CPU_FUSED = None
    try:
        yield
    finally:
        shared_prefix._CPU_FUSED = saved


def peak_gib(ctx: Context) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if ctx.device == "cuda" else "n/a (CPU)"


def reset_peak(ctx: Context) -> None:
    import torch

    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- part 1: CUDA correctness

def _random_llama(ctx: Context, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512) if ctx.quick else
             dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096))  # head dim 128 and 4:1 grouped query, as Llama-3-8B
    config = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, attn_implementation="sdpa",
                         initializer_range=0.05, **shape)
    return LlamaForCausalLM(config).to(device=ctx.device, dtype=dtype).eval()


def attention_layout(ctx: Context, vocab: int):
    """(head, parts, suffixes): a judge-like layout (instructions, conversations, 25 rule suffixes each)."""
    import random

    rng = random.Random(0)
    toks = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    if ctx.quick:
        head, part_lens, rules, suffix = toks(20), [30, 0, 55], 5, (3, 9)
    else:
        head, part_lens, rules, suffix = toks(180), [300, 0, 820], 25, (12, 40)
    parts = [toks(n) for n in part_lens]
    suffixes = [[toks(rng.randint(*suffix)) for _ in range(rules)] for _ in parts]
    return head, parts, suffixes


def attention_check(ctx: Context, dtype_name: str) -> dict:
    import torch

    from autorule_lib.verify import shared_prefix

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = _random_llama(ctx, dtype)
    vocab = model.config.vocab_size
    head, parts, suffixes = attention_layout(ctx, vocab)
    keep = 2
    with torch.inference_mode():
        whole = torch.stack([model(input_ids=torch.tensor([head + p + s], device=ctx.device)).logits[0, -keep:]
                             for p, rules in zip(parts, suffixes) for s in rules]).float()
        # The same suffixes read after another conversation: how far a wrong layout moves the logits.
        moved = torch.stack([model(input_ids=torch.tensor([head + parts[-1] + s], device=ctx.device)).logits[0, -keep:]
                             for s in suffixes[0]]).float()
        assert shared_prefix.enable(model)
        with non_cpu_attention_path():
            packed = shared_prefix.check_logits(model, head, parts, suffixes, keep).float()
    scale = whole.abs().max().item()
    err = (packed - whole).abs().max().item() / scale
    sensitivity = (moved - whole[:len(suffixes[0])]).abs().max().item() / scale
    argmax = (packed.argmax(-1) == whole.argmax(-1)).float().mean().item()
    tol = TOLERANCE[dtype_name]
    out = {"checks": len(whole), "max_rel_err": err, "tolerance": tol, "sensitivity": sensitivity,
           "argmax_agreement": argmax, "prompt_tokens_max": len(head) + max(map(len, parts)) + 40}
    del model
    if not math.isfinite(err) or err > tol:
        raise PartFailed(f"shared-prefix attention {dtype_name}: max relative error {err:.3g} > tolerance {tol}")
    if not sensitivity > 10 * tol:  # a check that a broken layout would fail
        raise PartFailed(f"{dtype_name}: a wrong prefix moves the logits by only {sensitivity:.3g} (< 10 x tolerance)")
    return out


def verdict_check(ctx: Context) -> dict:
    """Fast (prefix reuse) vs parity generation, and fast with vs without prefix reuse, on the tiny judge."""
    from autorule_lib.smoke.verifier import ensure_tiny_verifier
    from autorule_lib.verify.verifier import RuleVerifier, load_local_judge
    from autorule_lib.verify.prompt import load_template
    from autorule_lib.verify.backends import TransformersBackend
    from verifier_throughput import RULES, conversations

    profile = ctx.profile()
    profile.precision = "fp32"  # the tiny judge's own precision (smoke); bf16 is checked on the attention above
    model, tok = load_local_judge(str(ensure_tiny_verifier(profile, ctx.models_dir)), profile)
    if ctx.device == "cuda" and next(model.parameters()).device.type != "cuda":
        raise PartFailed("the tiny judge did not load onto CUDA")
    backend = TransformersBackend(model, tok)
    cfg = dataclasses.replace(profile.verifier, min_answer_mass=0.0, use_cache=False, truncate_prompt_tokens=None,
                              batch_size=25)
    convs = conversations(profile, tok, 2 if ctx.quick else 8, 500)
    rules = RULES[:5] if ctx.quick else RULES

    def run(mode, reuse=True):
        v = RuleVerifier(backend, load_template("conversation_first", cfg.concise_clause), cfg, "tiny", mode)
        v.reuse_prefix = reuse
        return [x for row in v.verify(convs, rules) for x in row]

    parity, fast, plain = run("parity"), run("fast"), run("fast", reuse=False)
    same = sum(a.value == b.value for a, b in zip(parity, fast) if a.value is not None and b.value is not None)
    unscored = {"parity": sum(x.value is None for x in parity), "fast": sum(x.value is None for x in fast)}
    dp = max(abs(a.p_yes - b.p_yes) for a, b in zip(fast, plain))
    out = {"checks": len(parity), "identical_verdicts": same, "unscored": unscored,
           "max_p_yes_diff_reuse_vs_reencode": dp, "prefix_reuse_active": backend.can_share_prefix}
    if any(unscored.values()) or same < MIN_AGREEMENT * len(parity):
        raise PartFailed(f"fast vs parity: {same}/{len(parity)} identical, unscored {unscored}")
    if not backend_ok(dp):
        raise PartFailed(f"fast with prefix reuse vs re-encoding: P(Yes) differs by up to {dp:.3g}")
    return out


def backend_ok(p_yes_diff: float) -> bool:
    return math.isfinite(p_yes_diff) and p_yes_diff < 1e-3  # fp32: the two encodings are the same computation


def part_correctness(ctx: Context):
    fig = {f"attention {d}": attention_check(ctx, d) for d in ("fp32", "bf16")}
    fig["verdicts"] = verdict_check(ctx)
    v = fig["verdicts"]
    summary = (f"attention max rel. err fp32 {fig['attention fp32']['max_rel_err']:.2g} (tol {TOLERANCE['fp32']}), "
               f"bf16 {fig['attention bf16']['max_rel_err']:.2g} (tol {TOLERANCE['bf16']}); verdicts fast vs parity "
               f"{v['identical_verdicts']}/{v['checks']} identical")
    return summary, fig


# ---------------------------------------------------------------- part 2: training stages

def part_training(ctx: Context):
    from autorule_lib.artifacts import read_json
    from autorule_lib.train.common import common_args
    from autorule_lib.layout import Run
    from autorule_lib.train.launch import run_stage

    profile = prepared_run(ctx)
    run = Run.at(profile, ctx.run_dir)
    bf16 = common_args(profile, ctx.work, learning_rate=1e-4, warmup_ratio=0.0, max_grad_norm=1.0, max_steps=1,
                       save_steps=1, gradient_checkpointing=False, betas=(0.9, 0.95))["bf16"]
    fig = {"bf16 mixed precision": bf16}
    variant = "autorule_uf"
    for stage, out in (("sft", run.layout.sft_dir), ("reward_model", run.layout.rm_dir),
                       ("grpo", run.layout.grpo_dir(variant))):
        reset_peak(ctx)
        t0 = time.perf_counter()
        run_stage(stage, run, variant=variant if stage == "grpo" else None, force=True)
        ctx.sync()
        history = read_json(out / "log_history.json")
        losses = [h["loss"] for h in history if "loss" in h]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise PartFailed(f"{stage}: no finite training loss logged ({losses})")
        fig[stage] = {"seconds": round(time.perf_counter() - t0, 1), "steps": read_json(out / "done.json")["global_step"],
                      "last_loss": losses[-1], "peak_device_memory": peak_gib(ctx)}
        if stage == "grpo":
            rule = [h["rewards/rule_reward/mean"] for h in history if "rewards/rule_reward/mean" in h]
            if not rule:
                raise PartFailed("grpo: no rule reward logged")
            fig[stage]["rule_reward_mean"] = rule[-1]
    norm = read_json(run.layout.rm_normalization)
    if not (math.isfinite(norm["mean"]) and math.isfinite(norm["std"]) and norm["std"] > 0):
        raise PartFailed(f"reward model normalisation not usable: {norm}")
    fig["reward_model"].update(mu=norm["mean"], sigma=norm["std"])
    summary = (f"sft {fig['sft']['seconds']} s, reward_model {fig['reward_model']['seconds']} s "
               f"(mu {norm['mean']:.3g}, sigma {norm['std']:.3g}), grpo {variant} {fig['grpo']['seconds']} s; "
               f"bf16 {bf16}")
    return summary, fig


# ---------------------------------------------------------------- part 3: verifier benchmark

def part_verifier_benchmark(ctx: Context):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "verifier_throughput.py"), "--model", "llama8b-random",
           "--device", ctx.device, "--models-dir", str(ctx.models_dir)]
    cmd += (["--quick-shape", "--conversations", "2", "--conversation-tokens", "120", "--batch-sizes", "25",
             "--repeats", "1"] if ctx.quick else
            ["--conversations", "8", "--conversation-tokens", "800", "--batch-sizes", "25", "--repeats", "2"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240 if ctx.quick else 330)
    if proc.returncode:
        raise RuntimeError(f"verifier_throughput exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    out = proc.stdout
    rates = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"^\s+((?:parity|fast) [^\n]+?)\s+([\d.]+) s\s+([\d.]+) checks/s", out, re.M)}
    last = re.search(r"fast_vs_parity_speedup=([\d.]+) prefix_reuse_speedup=([\d.]+)", out)
    if len(rates) != 4 or not last:
        raise PartFailed(f"could not read the benchmark's output:\n{out[-800:]}")
    tokens = re.search(r"judge-prompt tokens \(conversation_first\): (.+)", out)
    fig = {name: f"{s:.3f} s, {r:.1f} checks/s" for name, (s, r) in rates.items()}
    fig.update({"fast_vs_parity_speedup": float(last.group(1)), "prefix_reuse_speedup": float(last.group(2)),
                "judge-prompt tokens": tokens.group(1) if tokens else "?", "command": " ".join(cmd[1:]),
                "output": "\n\n```\n" + out.strip() + "\n```"})
    parity = rates["parity conversation_first"][1]
    fast = rates["fast conversation_first, prefix reuse"][1]
    return (f"parity {parity:.1f} checks/s, fast {fast:.1f} checks/s, fast_vs_parity {last.group(1)}x, "
            f"prefix_reuse {last.group(2)}x"), fig


# ---------------------------------------------------------------- part 4: GRPO step-time breakdown

def _llama_1b(ctx: Context, tok, seed: int):
    """Llama-3.2-1B's shape (random weights, bf16, the tokenizer's vocabulary); --quick: two narrow layers."""
    import torch
    from transformers import LlamaConfig

    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1) if ctx.quick else
             dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8))
    torch.manual_seed(seed)
    return LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=500000.0,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, dtype="bfloat16", **shape)


def _build(ctx: Context, cls, config, tok, path: Path):
    import torch

    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights first
    try:
        with torch.device(ctx.device):
            model = cls(config)
    finally:
        torch.set_default_dtype(torch.float32)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if path is not None:
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return model


class Timed:
    """A reward function (or scorer) that records how long each call took under ``label``; it keeps the
    function's ``__name__``, which TRL logs rewards under and the stage hashes."""

    def __init__(self, fn, label: str, clock: "StepClock"):
        self.fn, self.label, self.clock = fn, label, clock
        self.__name__ = getattr(fn, "__name__", label)

    def __call__(self, *args, **kwargs):
        with self.clock.measure(self.label):
            return self.fn(*args, **kwargs)


class StepClock:
    """Wall time of each optimizer step and of the named parts inside it (CUDA synchronised at each edge)."""

    def __init__(self, ctx: Context):
        self.ctx, self.edges, self.spans = ctx, [], []

    @contextlib.contextmanager
    def measure(self, name: str):
        self.ctx.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ctx.sync()
            self.spans.append((name, t0, time.perf_counter()))

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Edges(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.ctx.sync()
                clock.edges = [time.perf_counter()]

            def on_pre_optimizer_step(self, args, state, control, **kw):
                clock.ctx.sync()
                clock._opt = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kw):
                clock.ctx.sync()
                clock.spans.append(("optimizer step", clock._opt, time.perf_counter()))

            def on_step_end(self, args, state, control, **kw):
                clock.ctx.sync()
                clock.edges.append(time.perf_counter())

        return Edges()

    def shares(self, skip: int = 1) -> tuple[float, dict]:
        """(seconds per step, share of each part) over the steps after the first ``skip`` (warm-up)."""
        windows = list(zip(self.edges[skip:-1], self.edges[skip + 1:]))
        if not windows:
            raise PartFailed(f"only {len(self.edges) - 1} steps timed; need more than {skip}")
        total = sum(b - a for a, b in windows)
        parts: dict[str, float] = {}
        for name, t0, t1 in self.spans:
            if any(a <= t0 < b for a, b in windows):
                parts[name] = parts.get(name, 0.0) + (t1 - t0)
        parts["rest (policy log-probs, loss, backward, bookkeeping)"] = total - sum(parts.values())
        return total / len(windows), {k: v / total for k, v in parts.items()}


@contextlib.contextmanager
def timed_generation(clock: StepClock):
    """Time TRL's generation call (GRPOTrainer._generate_single_turn) for the length of the block."""
    from trl import GRPOTrainer

    original = GRPOTrainer._generate_single_turn

    def generate(self, *args, **kwargs):
        with clock.measure("generation"):
            return original(self, *args, **kwargs)

    GRPOTrainer._generate_single_turn = generate
    try:
        yield
    finally:
        GRPOTrainer._generate_single_turn = original


def part_grpo_breakdown(ctx: Context):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    from autorule_lib.artifacts import read_json
    from autorule_lib.train.rewards import build_reward_funcs
    from autorule_lib.train.reward_model import RewardModelScorer
    from autorule_lib.train.grpo import train_grpo
    from autorule_lib.layout import Run
    from autorule_lib.train.launch import uf_sets
    from autorule_lib.verify.verifier import RuleVerifier
    from autorule_lib.verify.prompt import load_template
    from autorule_lib.verify.backends import TransformersBackend
    from verifier_throughput import RULES

    profile = prepared_run(ctx)
    tok = AutoTokenizer.from_pretrained(str(ctx.models_dir / "tiny-tokenizer"))
    # Llama-3's vocabulary size. The tiny BPE has 1024 tokens; the others become added tokens ("<w1234>"), so
    # that what the random policy samples decodes to text the judge and the RM read at the same token length.
    tok.add_tokens([f"<w{i}>" for i in range(len(tok), 2048 if ctx.quick else 128256)])
    work = ctx.work / "grpo-1b"
    policy_dir, rm_dir = work / "policy", work / "rm"
    _build(ctx, LlamaForCausalLM, _llama_1b(ctx, tok, 1), tok, policy_dir)
    rm_config = _llama_1b(ctx, tok, 2)
    rm_config.num_labels = 1
    _build(ctx, LlamaForSequenceClassification, rm_config, tok, rm_dir)
    judge = _build(ctx, LlamaForCausalLM, _llama_1b(ctx, tok, 3), tok, None).eval()
    # A random judge puts almost no mass on [[Yes]]/[[No]]: min_answer_mass 0 keeps every check scored.
    vcfg = dataclasses.replace(profile.verifier, mode="fast", min_answer_mass=0.0, use_cache=False,
                               batch_size=50 if ctx.quick else 100)  # rules of 2 or 4 responses per pass
    verifier = RuleVerifier(TransformersBackend(judge, tok), load_template("conversation_first", vcfg.concise_clause),
                            vcfg, "random-1b", "fast")
    clock = StepClock(ctx)
    scorer = RewardModelScorer(rm_dir, profile.reward_model.pad_token, batch_size=16, device=ctx.device)
    scorer.model.to(dtype=judge.dtype)
    prompts, gens, completion, steps = (2, 2, 8, 2) if ctx.quick else (8, 8, 256, 3)
    profile.grpo = dataclasses.replace(
        profile.grpo, prompts_per_rollout=prompts, num_generations=gens, train_batch_size=prompts * gens,
        per_device_batch_size=min(16, prompts * gens), max_completion_length=completion, max_prompt_length=512,
        max_steps=steps, save_every_rollouts=10**6, temperature=1.0)
    variant = profile.grpo_variant("autorule_uf")
    funcs, weights = build_reward_funcs(profile, variant, rm_scorer=Timed(scorer.score_texts, "RM scoring", clock),
                                        rm_normalizer=(0.0, 1.0), tokenizer=tok, rules=RULES, verifier=verifier)
    funcs = [Timed(f, "verification", clock) if f.__name__ == "rule_reward" else f for f in funcs]
    with timed_generation(clock):
        train_grpo(profile, "autorule_uf", uf_sets(Run.at(profile, ctx.run_dir))["rl_prompts"], str(policy_dir), work / "run",
                   funcs, weights, force=True, callbacks=[clock.callback()])
    per_step, shares = clock.shares(skip=1)
    history = read_json(work / "run" / "log_history.json")
    lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
    named = ("generation", "verification", "RM scoring", "optimizer step")
    missing = [k for k in named if k not in shares]
    if missing:
        raise PartFailed(f"no time recorded for {missing} (spans: {sorted(shares)})")
    fig = {"policy": "Llama-3.2-1B shape" if not ctx.quick else "quick shape", "rules (K)": len(RULES),
           "responses per step": prompts * gens, "max completion tokens": completion,
           "mean completion tokens": lengths[-1] if lengths else "?", "verifier": f"{'quick-shaped' if ctx.quick else '1B-shaped'} random judge, fast mode",
           "steps timed": steps - 1, "seconds per step": round(per_step, 3), "peak device memory": peak_gib(ctx)}
    fig.update({f"share: {k}": f"{100 * v:.1f}%" for k, v in shares.items()})
    summary = f"{per_step:.2f} s/step; " + ", ".join(f"{k} {100 * shares[k]:.0f}%" for k in named)
    return summary, fig


PARTS = {"cuda_correctness": part_correctness, "training_stages": part_training,
         "verifier_benchmark": part_verifier_benchmark, "grpo_breakdown": part_grpo_breakdown}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"), help="results file")
    ap.add_argument("--work-dir", default=None, help="models and runs (default: a new temporary folder)")
    ap.add_argument("--models-dir", default=None, help="reuse the tiny models built under this folder")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--inject-failure", choices=list(PARTS), default=None,
                    help="make this part fail at its start (tests that the next part still runs)")
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no CUDA device (the CPU rehearsal: --device cpu --quick)")
    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        sys.exit(f"gpu_check: unknown part(s) {unknown}; have {list(PARTS)}")
    if a.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    if a.models_dir:  # tiny models built earlier (their build stamps make a changed recipe rebuild them)
        (work / "run").mkdir(parents=True, exist_ok=True)
        Path(a.models_dir).mkdir(parents=True, exist_ok=True)  # a link to nothing would stop every builder
        if not (work / "run" / "models").is_symlink():
            (work / "run" / "models").symlink_to(Path(a.models_dir).resolve(), target_is_directory=True)
    ctx = Context(a.device, a.quick, work, a.inject_failure)
    info = machine()
    print(f"gpu_check on {info['gpu']} ({info['host']}); "
          f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}; work dir {work}", flush=True)
    t0 = time.perf_counter()
    parts = [run_part(n, PARTS[n], ctx) for n in names]
    passed = sum(p.ok for p in parts)
    write_report(Path(a.out), parts, ctx, info, time.perf_counter() - t0)
    print(f"results: {a.out}")
    print(f"gpu_check: {passed} passed, {len(parts) - passed} failed", flush=True)
    return 0 if passed == len(parts) else 1


if __name__ == "__main__":
    sys.exit(main())
