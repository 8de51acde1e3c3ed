"""Training stages on TRL: the no-BOS format, resume from checkpoints, rejection of unrunnable configs."""
import dataclasses
import json

import pytest

from autorule_lib.config import ConfigError, TinyModelConfig
from autorule_lib.profiles import load_profile
from autorule_lib.smoke.models import build_tiny_llama, build_tiny_tokenizer
from autorule_lib.models import load_tokenizer
from autorule_lib.train.grpo import grpo_args
from autorule_lib.train.ppo import ppo_batch_args, train_ppo
from autorule_lib.train.reward_model import RewardModelScorer, load_rm_tokenizer, normalize_score_head, rm_normalization, train_reward_model
from autorule_lib.train.sft import sft_example, train_sft
from conftest import uf_row

ROWS = [uf_row(prompt=f"Question {i}: name a colour.", chosen=f"Blue is a calm colour number {i}.",
               rejected="no") for i in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    texts = [t for r in ROWS for t in (r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"])]
    tok = build_tiny_tokenizer(texts, cfg, d / "tok")
    build_tiny_llama(tok, cfg, d / "policy")
    return str(d / "policy")


def smoke(**sft):
    p = load_profile("smoke")
    p.sft = dataclasses.replace(p.sft, **sft)
    return p


def rows_with_content(rows):
    return [dict(r, chosen_content=r["chosen"][1]["content"], rejected_content=r["rejected"][1]["content"])
            for r in rows]


def test_sft_example_has_no_bos_and_masks_the_prompt(tiny):
    tok = load_tokenizer(tiny, pad_with_eos=True)
    ex = sft_example("Hi?", "Hello.", tok, 512)
    assert ex["input_ids"][0] != tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    n_prompt = len(tok("<|user|>Hi?<|assistant|>", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"]) == "<|user|>Hi?<|assistant|>Hello. <|end_of_text|>"


class StepRecorder:
    """A TrainerCallback that records the steps run and can stop the process mid-training."""

    def __init__(self, crash_at=None):
        self.crash_at, self.steps, self.start_step = crash_at, [], None

    def __getattr__(self, name):  # every other callback event: no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kw):
        self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)
        if state.global_step == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")


def test_sft_resumes_from_last_checkpoint_and_finished_stage_is_kept(tiny, tmp_path):
    profile = smoke(max_steps=4, save_steps=2, global_batch_size=2, per_device_batch_size=2)
    rows = rows_with_content(ROWS)
    first = StepRecorder(crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        train_sft(profile, rows, rows[:2], tiny, tmp_path / "sft", callbacks=[first])
    assert first.steps == [1, 2, 3] and (tmp_path / "sft/checkpoint-2").exists()
    assert not (tmp_path / "sft/done.json").exists()

    second = StepRecorder()
    train_sft(profile, rows, rows[:2], tiny, tmp_path / "sft", callbacks=[second])
    assert second.start_step == 2 and second.steps == [3, 4]  # continued, not restarted
    done = json.loads((tmp_path / "sft/done.json").read_text())
    assert done["global_step"] == 4 and (tmp_path / "sft/model/config.json").exists()

    third = StepRecorder()
    train_sft(profile, rows, rows[:2], tiny, tmp_path / "sft", callbacks=[third])
    assert third.start_step is None  # finished with the same settings: not retrained

    changed = smoke(max_steps=2, save_steps=2, global_batch_size=2, per_device_batch_size=2)
    train_sft(changed, rows, rows[:2], tiny, tmp_path / "sft")
    assert (tmp_path / "sft.old1/done.json").exists()  # the old run is moved aside, not deleted
    assert json.loads((tmp_path / "sft/done.json").read_text())["global_step"] == 2


def test_reward_model_reads_score_at_eos_and_normalises(tiny, tmp_path):
    profile = load_profile("smoke")
    profile.reward_model = dataclasses.replace(profile.reward_model, max_steps=2, global_batch_size=2,
                                               per_device_batch_size=2)
    rows = rows_with_content(ROWS)
    path = train_reward_model(profile, rows, rows[:2], tiny, tmp_path / "rm")
    scorer = RewardModelScorer(path, profile.reward_model.pad_token)
    assert scorer.tokenizer.pad_token_id != scorer.tokenizer.eos_token_id
    # right padding must not change a text's score: it is read at its own EOS
    alone = scorer.score_texts(["<|user|>a<|assistant|>b <|end_of_text|>"])[0]
    padded = scorer.score_texts(["<|user|>a<|assistant|>b <|end_of_text|>",
                                 "<|user|>a much longer prompt here<|assistant|>and a longer answer <|end_of_text|>"])
    assert padded[0] == pytest.approx(alone, abs=1e-5)
    stats = rm_normalization(scorer, rows[:4])
    assert stats["n_texts"] == 8 and stats["std"] > 0


def test_unrunnable_configs_are_rejected_before_training(tiny, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="sft: global batch 10 is not a multiple"):
        train_sft(smoke(global_batch_size=10, per_device_batch_size=4), rows_with_content(ROWS), [], tiny,
                    tmp_path / "a")
    p = load_profile("smoke")
    p.report_to = "wandb"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="report_to: 'wandb' needs the WANDB_API_KEY"):
        train_sft(p, rows_with_content(ROWS), [], tiny, tmp_path / "b")
    p = load_profile("smoke")
    p.grpo_variants["odd"] = {"prompts_per_rollout": 3, "num_generations": 2, "train_batch_size": 4}
    with pytest.raises(ConfigError, match="grpo: prompts_per_rollout x num_generations = 6"):
        grpo_args(p, p.grpo_variant("odd"), tmp_path / "c")
    p.reward_model = dataclasses.replace(p.reward_model, pad_token="<|not_a_token|>")
    with pytest.raises(ConfigError, match="reward_model.pad_token"):
        load_rm_tokenizer(tiny, p.reward_model.pad_token)


def test_grpo_kl_switch_and_loss_mapping(tmp_path):
    p = load_profile("paper")
    p.device = "auto"  # the mapping, not the hardware, is under test
    nominal = grpo_args(p, p.grpo_variant("rm_only"), tmp_path)
    p.grpo = dataclasses.replace(p.grpo, kl_mode="original_zero_grad")
    zero = grpo_args(p, p.grpo_variant("rm_only"), tmp_path)
    assert nominal["beta"] == 1e-3 and zero["beta"] == 0.0
    assert nominal["generation_batch_size"] == 2048 and nominal["loss_type"] == "bnpo"
    assert nominal["save_steps"] == 2 * 16  # every 2 rollouts of 16 updates
    assert grpo_args(p, p.grpo_variant("length_control"), tmp_path)["learning_rate"] == 3e-7


def test_rm_normalization_is_mean_and_unbiased_std_over_chosen_and_rejected():
    class Fixed:
        def score(self, prompts, responses):
            return [{"c": 1.0, "r": 3.0}[x] for x in responses]

    stats = rm_normalization(Fixed(), [{"prompt": "p", "chosen_content": "c", "rejected_content": "r"}])
    # scores {1, 3}: unbiased std sqrt(2) as the original's torch.std (the population std would be 1)
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(2 ** 0.5) and stats["n_texts"] == 2
    assert stats["pair_accuracy"] == 0.0


# ---------------------------------------------------------------- fidelity (issue 13)

def _capture_trainer_args(monkeypatch, module, name):
    """Replace a TRL trainer class by one that records its args and stops before training."""
    seen = {}

    class Stop(Exception):
        pass

    class Capture:
        def __init__(self, *a, args=None, **kw):
            seen["args"] = args
            raise Stop

    monkeypatch.setattr(module, name, Capture)
    return seen, Stop


def test_rm_and_ppo_optimizers_get_the_profiles_betas(tiny, tmp_path, monkeypatch):
    """OpenRLHF's Adam betas (0.9, 0.95) in every stage: the RM and PPO used to fall back to TRL's 0.999."""
    import trl
    import trl.experimental.ppo as ppo_mod

    p = load_profile("smoke")
    assert (p.reward_model.adam_beta2, p.ppo.adam_beta2) == (0.95, 0.95)
    seen, Stop = _capture_trainer_args(monkeypatch, trl, "RewardTrainer")
    with pytest.raises(Stop):
        train_reward_model(p, rows_with_content(ROWS), rows_with_content(ROWS)[:2], tiny, tmp_path / "rm")
    assert (seen["args"].adam_beta1, seen["args"].adam_beta2) == (0.9, 0.95)
    seen, Stop = _capture_trainer_args(monkeypatch, ppo_mod, "PPOTrainer")
    (tmp_path / "rm_normalization.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    with pytest.raises(Stop):
        train_ppo(p, rows_with_content(ROWS), tiny, tiny, tmp_path / "ppo", rm_normalizer=(0.0, 1.0))
    assert (seen["args"].adam_beta1, seen["args"].adam_beta2) == (0.9, 0.95)


def _trl_ppo_update_sizes(args, world: int) -> list[int]:
    """trl 1.12's PPO update loop (trl/experimental/ppo/ppo_trainer.py, `train`), reduced to its batch
    arithmetic, with the real Accelerator deciding when the optimizer steps: sequences per update, summed
    over the ranks."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    local_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps  # as TRL computes it
    local_mini = local_batch // args.num_mini_batches
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=True)
    model = acc.prepare(torch.nn.Linear(1, 1))
    sizes, pending = [], 0
    for _ in range(args.num_ppo_epochs):
        for mini_start in range(0, local_batch, local_mini):
            for micro_start in range(0, local_mini, args.per_device_train_batch_size):
                with acc.accumulate(model):
                    pending += len(range(micro_start, min(micro_start + args.per_device_train_batch_size, local_mini)))
                    if acc.sync_gradients:
                        sizes.append(pending * world)
                        pending = 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return sizes


@pytest.mark.parametrize("world", [1, 8])
def test_ppo_batch_mapping_gives_8_updates_of_128_per_1024_prompt_rollout(world):
    import inspect
    import types

    from trl.experimental.ppo import ppo_trainer

    src = inspect.getsource(ppo_trainer.PPOTrainer.__init__)  # the arithmetic the simulation relies on
    assert "args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps" in src
    assert "Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)" in src
    cfg = load_profile("paper").ppo
    mapped = types.SimpleNamespace(**ppo_batch_args(cfg, world), num_ppo_epochs=1)
    assert mapped.per_device_train_batch_size * mapped.gradient_accumulation_steps * world == 1024  # the rollout
    assert _trl_ppo_update_sizes(mapped, world) == [128] * 8
    old = types.SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1024 // world // 4,
                                num_mini_batches=8, num_ppo_epochs=1)  # the previous mapping
    assert _trl_ppo_update_sizes(old, world) == [1024]  # one update per rollout: what the test guards against


def test_ppo_reward_is_z_normalised_in_the_reward_head(tiny):
    import torch
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    x = torch.randn(3, 5, rm.config.hidden_size)
    raw = rm.score(x)
    normalize_score_head(rm, mean=1.5, std=4.0)
    assert torch.allclose(rm.score(x), (raw - 1.5) / 4.0, atol=1e-5)
    assert load_profile("paper").ppo.normalize_reward is True


def test_grpo_micro_batch_is_per_variant_as_the_original(tmp_path):
    p = load_profile("paper")
    p.device = "auto"
    micro = {n: grpo_args(p, p.grpo_variant(n), tmp_path)["per_device_train_batch_size"] for n in p.grpo_variants}
    assert micro == {"autorule_uf": 4, "autorule_mt": 4, "rm_only": 16, "length_penalty": 16, "length_control": 16,
                     "autorule_uf_2ep": 4, "rm_only_2ep": 16}
