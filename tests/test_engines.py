"""The device and engine policy (autorule_lib.engines) with fake vLLM engines: on a GPU, an engine still
held when the next one starts fails for memory; here the order of loads and releases shows it."""
import sys
import types

import pytest

from autorule_lib import engines
from autorule_lib.config import ConfigError
from autorule_lib.profiles import load_profile


class FakeCore:
    def __init__(self):
        self.shut = 0

    def shutdown(self):
        self.shut += 1


class FakeLLM:
    """vllm.LLM's shape as far as the book uses it: kwargs recorded, an engine core that can be shut down."""
    made: list["FakeLLM"] = []

    def __init__(self, model=None, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.llm_engine = types.SimpleNamespace(engine_core=FakeCore())
        FakeLLM.made.append(self)

    @property
    def shut(self):
        return self.llm_engine.engine_core.shut

    def generate(self, inputs, params, use_tqdm=False):
        out = types.SimpleNamespace(text=" an answer", token_ids=[1, 2], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

    def chat(self, messages, params, use_tqdm=False):
        out = types.SimpleNamespace(text="[[Yes]]", token_ids=[1])
        return [types.SimpleNamespace(outputs=[out], prompt_token_ids=[1, 2, 3])]


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.made = []
    engines.release_all()
    engines.EVENTS.clear()
    yield mod
    engines.release_all()


@pytest.fixture(autouse=True)
def clean_registry():
    engines.release_all()
    engines.EVENTS.clear()
    yield
    engines.release_all()


def test_make_room_releases_every_other_holder_before_a_load():
    released = []
    engines.register("judge", lambda: released.append("judge"))
    engines.register("reward_model", lambda: released.append("reward_model"))
    engines.make_room("judge")
    assert released == ["reward_model"] and engines.holders() == ["judge"]
    engines.make_room("generation")
    assert released == ["reward_model", "judge"] and engines.holders() == []


def test_alpaca_eval_module_global_engine_is_released(monkeypatch):
    """alpaca_eval.decoders.vllm_local keeps its engine in a module global between calls."""
    mod = types.ModuleType("alpaca_eval.decoders.vllm_local")
    mod.llm, mod.llmModelName, mod.tokenizer = FakeLLM("m"), "m", object()
    monkeypatch.setitem(sys.modules, "alpaca_eval.decoders.vllm_local", mod)
    engine = mod.llm
    assert engines.release_alpaca_eval_engine() is True
    assert mod.llm is None and mod.llmModelName is None and engine.shut == 1
    assert engines.release_alpaca_eval_engine() is False


def test_alpaca_eval_run_releases_others_first_and_its_engine_after(monkeypatch, tmp_path):
    """Chapter 07 (paper): MT-Bench generation after alpaca_eval must find the GPU free."""
    pytest.importorskip("alpaca_eval")
    import alpaca_eval.main

    from autorule_lib.evaluate import alpaca

    mod = types.ModuleType("alpaca_eval.decoders.vllm_local")
    mod.llm = mod.llmModelName = mod.tokenizer = None
    monkeypatch.setitem(sys.modules, "alpaca_eval.decoders.vllm_local", mod)
    order = []
    engines.register("generation", lambda: order.append("generation released"))

    def fake_evaluate(**kw):  # what alpaca_eval does: start an engine and keep it in its module global
        order.append("alpaca_eval starts its engine")
        mod.llm, mod.llmModelName = FakeLLM(kw["model_configs"]), kw["model_configs"]

    monkeypatch.setattr(alpaca_eval.main, "evaluate_from_model", fake_evaluate)
    alpaca.write_model_config(tmp_path, "sft", tmp_path / "model")
    alpaca.evaluate_from_config(tmp_path, "sft", tmp_path / "out")
    assert order == ["generation released", "alpaca_eval starts its engine"]
    assert mod.llm is None and FakeLLM.made[-1].shut == 1


def test_generation_engine_gets_the_profile_share_and_leaves_before_the_judge(fake_vllm, tmp_path, models_dir):
    from autorule_lib.evaluate import generation
    from autorule_lib.evaluate.judge import LikelihoodJudge
    from autorule_lib.smoke.models import ensure_tiny_models

    prof = load_profile("smoke")
    prof.evaluation.vllm_gpu_memory_utilization = 0.6
    engines.configure(prof)
    tiny = ensure_tiny_models(prof, models_dir)
    settings = generation.GenerationSettings(max_new_tokens=4, batch_size=2)
    out = generation.generate(tiny["policy"], ["<|user|>hi<|assistant|>"], settings, None, device="cuda",
                              engine="vllm")
    assert out[0]["text"] == "an answer"
    (engine,) = FakeLLM.made
    assert engine.kwargs["gpu_memory_utilization"] == 0.6  # never vLLM's default beside other models
    assert engines.holders() == ["generation"] and engine.shut == 0
    judge = LikelihoodJudge(str(tiny["verifier"]))  # chapter 07: the judge loads next, on CPU here
    judge.score([{"role": "user", "content": "Which is better?"}], ["A", "B"])
    assert engine.shut == 1 and engines.holders() == ["judge"]
    assert engines.EVENTS == ["load generation", "release generation", "load judge"]


def test_local_judge_engine_is_released_before_generation(fake_vllm, models_dir):
    """Chapter 07 (single_gpu): the local judge's vLLM engine is not kept for the whole chapter."""
    from autorule_lib.evaluate import generation
    from autorule_lib.llm.clients import LocalClient
    from autorule_lib.smoke.models import ensure_tiny_models

    client = LocalClient("judge-model", device="cuda", gpu_memory_utilization=0.5, temperature=0.0, max_tokens=8)
    client.complete([{"role": "user", "content": "rate this"}])
    judge_engine = FakeLLM.made[0]
    assert judge_engine.kwargs["gpu_memory_utilization"] == 0.5 and judge_engine.kwargs["enable_prefix_caching"]
    tiny = ensure_tiny_models(load_profile("smoke"), models_dir)
    generation.generate(tiny["policy"], ["<|user|>hi<|assistant|>"], generation.GenerationSettings(max_new_tokens=2),
                        None, device="cuda", engine="vllm")
    assert judge_engine.shut == 1 and client._loaded is None
    client.complete([{"role": "user", "content": "rate this"}])  # reloads when used again
    assert len(FakeLLM.made) == 3 and FakeLLM.made[1].shut == 1


def test_verifier_engine_starts_on_use_with_its_share_and_is_released(fake_vllm, models_dir):
    """Chapter 08: the verifier's engine asks for verifier.gpu_memory_utilization, not vLLM's 0.9, and
    is shut down before the next model loads."""
    from autorule_lib.verify.verifier import build_verifier

    prof = load_profile("smoke")
    prof.verifier.backend, prof.verifier.gpu_memory_utilization = "vllm", 0.25
    v = build_verifier(prof, models_dir, use_cache=False)
    assert v.backend.name == "vllm" and FakeLLM.made == []  # nothing reserved until the first check
    v.backend.llm
    assert FakeLLM.made[0].kwargs["gpu_memory_utilization"] == 0.25
    engines.make_room("reward_model")
    assert FakeLLM.made[0].shut == 1 and v.backend._llm is None


def test_reward_hacking_models_take_turns(fake_vllm, monkeypatch, tmp_path):
    """Chapter 08: the RM is loaded on first use and released before the verifier engine starts."""
    from autorule_lib.evaluate import reward_hacking as rh

    order = []

    class FakeScorer:
        def __init__(self, path, pad, device):
            order.append("rm loaded")
            self.tokenizer = types.SimpleNamespace(eos_token="</s>")

        def score_texts(self, texts):
            return [0.0 for _ in texts]

    monkeypatch.setattr(rh, "RewardModelScorer", FakeScorer)
    rm = rh.RMScores.__new__(rh.RMScores)
    rm.path, rm.mean, rm.std, rm.pad_token, rm.device, rm.reward = tmp_path, 0.0, 1.0, None, "cuda", None
    assert order == []  # constructing loads nothing
    rm(["p"], ["r"])
    assert order == ["rm loaded"] and engines.holders() == ["reward_model"]
    engines.make_room("rule_verifier")
    assert rm.reward is None
    rm(["p"], ["r"])
    assert order == ["rm loaded", "rm loaded"]


def test_vllm_share_is_checked():
    assert engines.vllm_kwargs(0.3) == {"gpu_memory_utilization": 0.3}
    for bad in (0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            engines.vllm_kwargs(bad)


def test_no_verifier_engine_per_training_rank(monkeypatch):
    with pytest.raises(ConfigError, match="one vLLM engine per rank"):
        engines.check_verifier_engine_layout("vllm", world_size=8)
    engines.check_verifier_engine_layout("vllm", world_size=1)
    engines.check_verifier_engine_layout("vllm_server", world_size=8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError):
        engines.check_verifier_engine_layout("vllm")


def test_local_extraction_runs_on_the_profile_device(monkeypatch):
    """single_gpu extraction (llm: local) used to run on CPU: make_client got no device."""
    from autorule_lib.extraction import pipeline as extraction

    seen = {}

    def fake_make_client(cfg, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(extraction, "make_client", fake_make_client)
    monkeypatch.setattr(extraction, "build_examples", lambda *a, **k: ([{"x": 1}], {}))
    prof = load_profile("single_gpu")
    monkeypatch.setattr("autorule_lib.models.pick_device", lambda p: p.device)
    with pytest.raises(RuntimeError, match="stop here"):
        extraction.extract_rules(prof, "uf", [], "/nonexistent")
    assert seen["device"] == "cuda"


def test_local_client_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    from autorule_lib.llm import clients as llm

    monkeypatch.setattr("autorule_lib.models.default_device", lambda: "cuda")
    client = llm.make_client(types.SimpleNamespace(llm="local", model="m"))
    assert client.device == "cuda"
    assert llm.make_client(types.SimpleNamespace(llm="local", model="m"), device="cpu").device == "cpu"
