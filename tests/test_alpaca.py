"""AlpacaEval 2.0: the seed's config files, read back by alpaca_eval, and its own LC win rate offline."""
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from autorule_lib.evaluate import alpaca

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "authors_readme" / "evaluation_texts.md"
# fixtures/authors_readme/evaluation_texts.md §2, restored layout.
SEED_CONFIG = '''[model-name]:
  prompt_template: "[model-name]/prompt.txt"
  fn_completions: "vllm_local_completions"
  completions_kwargs:
    model_name: "[model-name/path]"
    batch_size: 16
    max_new_tokens: 4096
    model_kwargs:
      dtype: bfloat16
    temperature: 0.9
    top_p: 1.0
'''


def test_template_is_the_seed_text():
    assert alpaca.CONFIG_TEMPLATE == SEED_CONFIG
    assert alpaca.PROMPT_TXT == "<|user|>{instruction}<|assistant|>"
    block = re.search(r"## 2\..*?```yaml\n(.*?)```", SEED.read_text(), re.S).group(1)
    assert alpaca.CONFIG_TEMPLATE == block
    assert "`prompt.txt` holds the single line `<|user|>{instruction}<|assistant|>`" in SEED.read_text()


def test_written_files_match_the_seed_and_alpaca_eval_reads_them(tmp_path):
    folder = alpaca.write_model_config(tmp_path, "ar-llama-autorule_uf", "/runs/paper/06_grpo/autorule_uf/final")
    expected = SEED_CONFIG.replace("[model-name/path]", "/runs/paper/06_grpo/autorule_uf/final").replace(
        "[model-name]", "ar-llama-autorule_uf")
    assert (folder / "configs.yaml").read_text() == expected
    assert (folder / "prompt.txt").read_bytes() == b"<|user|>{instruction}<|assistant|>"  # no newline

    from alpaca_eval import utils

    configs = utils.load_configs("ar-llama-autorule_uf", relative_to=tmp_path)
    cfg = configs["ar-llama-autorule_uf"]
    assert cfg["fn_completions"] == "vllm_local_completions"
    assert cfg["completions_kwargs"] == {"model_name": "/runs/paper/06_grpo/autorule_uf/final", "batch_size": 16,
                                         "max_new_tokens": 4096, "model_kwargs": {"dtype": "bfloat16"},
                                         "temperature": 0.9, "top_p": 1.0}
    template = utils.read_or_return(cfg["prompt_template"], relative_to=tmp_path)
    prompts, _ = utils.make_prompts(pd.DataFrame({"instruction": ["Name a color."]}), template=template)
    assert prompts == ["<|user|>Name a color.<|assistant|>"]


def test_model_names_that_would_break_the_config_are_refused(tmp_path):
    for bad in ("a/b", "x: y", ""):
        with pytest.raises(ValueError):
            alpaca.write_model_config(tmp_path, bad, "/m")
    text = alpaca.model_config_text("m", 'C:\\models\\"x"')
    import yaml

    assert yaml.safe_load(text)["m"]["completions_kwargs"]["model_name"] == 'C:\\models\\"x"'


# ---------------------------------------------------------------- LC win rate through alpaca_eval

def stand_in_df_gamed(path: Path, n: int, rng) -> Path:
    """alpaca_eval's Hub file df_gamed.csv, in its columns, for offline tests only."""
    difficulty = rng.normal(size=n)
    rows = []
    for model in ("gamed_verbose", "gamed_concise"):
        for i in range(n):
            d = float(rng.normal())
            rows.append({"model": model, "index": i, "instruction_difficulty": difficulty[i], "std_delta_len": d,
                         "preference": float(1 / (1 + np.exp(-(d + difficulty[i])))), "not_gamed_baseline": False})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def annotations(n: int, rng) -> pd.DataFrame:
    """A small AlpacaEval annotation file: the model's answers are longer and preferred more often."""
    len_ref, len_model = rng.integers(5, 50, n), rng.integers(5, 120, n)
    pref = np.where(rng.uniform(size=n) < 1 / (1 + np.exp(-(len_model - len_ref) / 30)), 2.0, 1.0)
    return pd.DataFrame({"index": range(n), "instruction": [f"q{i}" for i in range(n)],
                         "output_1": ["ref " * int(x) for x in len_ref], "output_2": ["ans " * int(x) for x in len_model],
                         "generator_1": "gpt4_1106_preview", "generator_2": "ar-llama-autorule_uf",
                         "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": pref})


def test_lc_win_rate_comes_from_alpaca_eval(tmp_path):
    import alpaca_eval.metrics.glm_winrate as glm

    rng = np.random.default_rng(0)
    ann = annotations(60, rng)
    ann_path = tmp_path / "annotations.json"
    ann.to_json(ann_path, orient="records", indent=2)
    gamed = stand_in_df_gamed(tmp_path / "df_gamed.csv", 60, rng)
    weights_dir = Path(glm.__file__).parent / "weights"
    before = sorted(weights_dir.rglob("*")) if weights_dir.exists() else []
    # the one download alpaca_eval makes is stood in at its boundary; everything else is its own code
    with mock.patch.object(glm, "hf_hub_download", return_value=str(gamed)) as download, \
            mock.patch.object(glm, "get_length_controlled_winrate", wraps=glm.get_length_controlled_winrate) as lc:
        with mock.patch("alpaca_eval.metrics.get_length_controlled_winrate", lc):
            out = alpaca.lc_win_rate(ann_path)
    assert download.call_args.kwargs["filename"] == "df_gamed.csv"
    assert lc.call_count == 1 and lc.call_args.kwargs["save_weights_dir"] is None
    assert out["win_rate"] == pytest.approx(100 * (ann["preference"] == 2.0).mean())
    assert 0 < out["length_controlled_winrate"] < 100 and out["length_controlled_winrate"] != out["win_rate"]
    assert out["generator"] == "ar-llama-autorule_uf" and out["baseline"] == "gpt4_1106_preview"
    assert (sorted(weights_dir.rglob("*")) if weights_dir.exists() else []) == before  # nothing in site-packages


def test_annotation_file_without_the_needed_columns_is_refused(tmp_path):
    path = tmp_path / "annotations.json"
    pd.DataFrame({"preference": [1.0], "output_1": ["a"]}).to_json(path, orient="records")
    with pytest.raises(ValueError, match="generator_1"):
        alpaca.lc_win_rate(path)


def test_running_alpaca_eval_uses_the_written_config_and_keeps_weights_out_of_site_packages(tmp_path):
    """No vLLM or judge here: alpaca_eval's generation and evaluate steps are stood in, its config loading is not."""
    import alpaca_eval.main as main
    from alpaca_eval import decoders

    models_dir = tmp_path / "models_configs"
    alpaca.write_model_config(models_dir, "ar-llama-sft", "/runs/x/04_sft/model")
    seen = {}

    def fake_completions(prompts, **kwargs):
        seen["prompts"], seen["kwargs"] = prompts, kwargs
        return {"completions": ["blue"] * len(prompts)}

    def fake_evaluate(**kwargs):
        seen["evaluate"] = kwargs
        return None

    data = pd.DataFrame({"instruction": ["Name a color."], "output": ["red"], "generator": ["ref"], "dataset": ["d"]})
    with mock.patch.object(decoders, "get_fn_completions", return_value=fake_completions), \
            mock.patch.object(main, "evaluate", side_effect=fake_evaluate), \
            mock.patch.object(main.utils, "load_or_convert_to_dataframe", side_effect=lambda x: x if isinstance(
                x, pd.DataFrame) else data):
        path = alpaca.evaluate_from_config(models_dir, "ar-llama-sft", tmp_path / "results")
    assert seen["prompts"] == ["<|user|>Name a color.<|assistant|>"]
    assert seen["kwargs"]["model_name"] == "/runs/x/04_sft/model" and seen["kwargs"]["temperature"] == 0.9
    assert seen["evaluate"]["metric_kwargs"] == {"save_weights_dir": None} and "base_dir" not in seen["evaluate"]
    assert path == tmp_path / "results" / "ar-llama-sft" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"


def test_run_mode_says_what_is_missing_before_generating(monkeypatch):
    from autorule_lib.evaluate.evaluator import check_alpaca_eval_can_run

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY.*'annotations'"):
        check_alpaca_eval_can_run("weighted_alpaca_eval_gpt4_turbo")
