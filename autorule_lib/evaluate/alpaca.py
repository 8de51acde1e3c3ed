"""AlpacaEval 2.0 (book/method.md §5): the authors' model config per checkpoint, and the LC win rate.

``write_model_config`` writes ``<models_dir>/<name>/configs.yaml`` and ``prompt.txt`` exactly as the
authors' README gives them (fixtures/authors_readme/evaluation_texts.md §2), so ``alpaca_eval evaluate_from_model --model_configs <name>
--base_dir <models_dir>`` generates with vLLM as the authors did. The length-controlled win rate is
alpaca_eval's own implementation (``alpaca_eval.metrics.get_length_controlled_winrate``), applied to
an annotations file; it fits its GLM together with a reference table (``df_gamed.csv``) that it
always downloads from the Hugging Face Hub, so this step needs the Hub (tests stand that one file
in at the download boundary).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import engines
from ..artifacts import atomic_write_text

# fixtures/authors_readme/evaluation_texts.md §2, restored layout, verbatim; [model-name] and [model-name/path] are filled in.
CONFIG_TEMPLATE = '''[model-name]:
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
# No trailing newline: alpaca_eval formats the file's text as is, and the model answers right after
# "<|assistant|>" in its training format.
PROMPT_TXT = "<|user|>{instruction}<|assistant|>"
ANNOTATION_COLUMNS = ("preference", "output_1", "output_2", "generator_1", "generator_2", "index")


def _yaml_string(value: str) -> str:
    """A double-quoted YAML scalar: identical to the authors' "..." for plain names and paths."""
    return json.dumps(value, ensure_ascii=False)


def model_config_text(name: str, model_path: str) -> str:
    if any(c in name for c in ':/\\"\n') or not name.strip():
        raise ValueError(f"AlpacaEval model name {name!r}: use letters, digits, '-', '_' or '.'")
    return (CONFIG_TEMPLATE.replace("[model-name/path]", _yaml_string(str(model_path))[1:-1])
            .replace("[model-name]", name))


def write_model_config(models_dir: str | Path, name: str, model_path: str | Path) -> Path:
    """``<models_dir>/<name>/configs.yaml`` and ``prompt.txt``; returns the folder."""
    folder = Path(models_dir) / name
    atomic_write_text(folder / "configs.yaml", model_config_text(name, str(model_path)))
    atomic_write_text(folder / "prompt.txt", PROMPT_TXT)
    return folder


def evaluate_from_config(models_dir: str | Path, name: str, output_dir: str | Path,
                         annotators_config: str = "weighted_alpaca_eval_gpt4_turbo") -> Path:
    """Run alpaca_eval on one written config (vLLM generation + the annotator); returns annotations.json.

    Needs a GPU with vLLM and the annotator's API key (OPENAI_API_KEY for the default).
    """
    from unittest import mock

    from alpaca_eval import constants
    from alpaca_eval.main import evaluate_from_model

    engines.make_room("alpaca_eval")  # its engine asks for vLLM's default share: nothing else may hold the GPU
    out = Path(output_dir) / name
    # The seed's prompt_template is relative to alpaca_eval's models-config folder. Passing base_dir=
    # would also reach the annotator (evaluate forwards unknown keywords to it) and break the lookup of
    # its own config, so the folder constant is pointed at ours for this call instead.
    with mock.patch.object(constants, "MODELS_CONFIG_DIR", Path(models_dir)):
        try:
            evaluate_from_model(model_configs=name, annotators_config=annotators_config, output_path=str(out),
                                is_return_instead_of_print=True, metric_kwargs={"save_weights_dir": None})
        finally:  # alpaca_eval keeps the engine in a module global; the next model (or MT-Bench) needs the GPU
            engines.release_alpaca_eval_engine()
    return out / annotators_config / "annotations.json"


def load_annotations(path: str | Path) -> pd.DataFrame:
    df = pd.read_json(path)
    missing = [c for c in ANNOTATION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: AlpacaEval annotations lack column(s) {missing} (need {list(ANNOTATION_COLUMNS)})")
    return df


def lc_win_rate(annotations: pd.DataFrame | str | Path) -> dict:
    """alpaca_eval's length-controlled win rate (and its raw win rate) from annotations.

    ``save_weights_dir=None``: the default would write GLM weights into site-packages.
    """
    from alpaca_eval.metrics import get_length_controlled_winrate

    df = load_annotations(annotations) if not isinstance(annotations, pd.DataFrame) else annotations.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn/pandas deprecation chatter from inside alpaca_eval
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        metrics = get_length_controlled_winrate(df, save_weights_dir=None)
    keep = ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "n_wins", "n_draws",
            "n_total", "avg_length")
    out = {k: (float(v) if isinstance(v, (int, float, np.number)) else v) for k, v in metrics.items() if k in keep}
    out["generator"] = str(df["generator_2"].iloc[0])
    out["baseline"] = str(df["generator_1"].iloc[0])
    return out
