import hashlib
import os

import pytest

# Nothing in the test suite may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class WordTokenizer:
    """One token per whitespace word plus a BOS, like ``encode`` on Llama-3: lengths are exact in tests."""

    def __call__(self, texts):
        return {"input_ids": [[0] + [1] * len(t.split()) for t in texts]}


@pytest.fixture
def word_tokenizer():
    return WordTokenizer()


def uf_row(prompt="What is 2+2?", chosen="It is 4.", rejected="It is 5.", score_chosen=8.0, score_rejected=3.0):
    """An UltraFeedback-binarized row in the Hub schema."""
    chosen_msgs = [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen_msgs,
            "rejected": [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}],
            "messages": [dict(m) for m in chosen_msgs], "score_chosen": score_chosen, "score_rejected": score_rejected}


def mt_row(question_id=81, winner="model_a", turn=1, model_a="gpt-4", model_b="llama-13b", judge="author_0"):
    conv = lambda who: [{"content": f"Q{question_id} turn 1", "role": "user"},  # noqa: E731
                        {"content": f"{who} answer 1", "role": "assistant"},
                        {"content": f"Q{question_id} turn 2", "role": "user"},
                        {"content": f"{who} answer 2", "role": "assistant"}]
    return {"question_id": question_id, "model_a": model_a, "model_b": model_b, "winner": winner, "judge": judge,
            "conversation_a": conv(model_a), "conversation_b": conv(model_b), "turn": turn}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on one thread: immune to CPU contention from other processes."""
    from autorule_lib.smoke.verifier import one_torch_thread as one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def models_dir(request, tmp_path_factory):
    """The smoke profile's tiny models, built by its fixture builder and listed in the registry the method
    resolves model roles through; built once and reused across sessions (the build stamps cover the
    recipe, tokenizer and prompts)."""
    from autorule_lib.profiles import load_profile
    from autorule_lib.smoke.build import build_models

    cache = getattr(request.config, "cache", None)
    path = cache.mkdir("autorule-tiny-models") if cache else tmp_path_factory.mktemp("models")
    build_models(load_profile("smoke"), path)
    return path


def with_smoke_models(models_dir, run_dir):
    """``run_dir`` with the smoke models in its ``models`` folder (a copy of the built fixture, registry
    included), as the chapter prologue leaves a run directory; returns ``run_dir``."""
    import shutil
    from pathlib import Path

    shutil.copytree(models_dir, Path(run_dir) / "models", ignore=shutil.ignore_patterns(".*", "README*"),
                    dirs_exist_ok=True)
    return Path(run_dir)


FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtokenVALUE123456", "AWS_SECRET_ACCESS_KEY": "fakeAwsSecretKEY987654321",
                "WANDB_API_KEY": "fakeWandbKey0123456789", "OPENAI_API_KEY": "sk-fakeOpenAIkey55555"}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole smoke book executed once per session (several minutes), with fake secrets in the
    environment; shared by the end-to-end test and the browser test. Returns (run_dir, env, result)."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("smoke_run")
    env = {**os.environ, **FAKE_SECRETS}
    result = subprocess.run([sys.executable, "-m", "autorule_lib.book.cli", "run", "--profile", "smoke", "--output-dir",
                             str(run_dir)], env=env, capture_output=True, text=True, timeout=900)
    return run_dir, env, result


@pytest.fixture(scope="session")
def smoke_book(request):
    """(run_dir, html folder) of the smoke book; ``AUTORULE_BOOK_RUN_DIR`` names an already built run instead."""
    import subprocess
    import sys
    from pathlib import Path

    given = os.environ.get("AUTORULE_BOOK_RUN_DIR")
    if given:
        html = Path(given) / "book" / "_build" / "html"
        assert (html / "index.html").exists(), f"AUTORULE_BOOK_RUN_DIR={given}: no built book (autorule book)"
        return Path(given), html
    run_dir, env, result = request.getfixturevalue("smoke_run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    book = subprocess.run([sys.executable, "-m", "autorule_lib.book.cli", "book", "--profile", "smoke", "--output-dir",
                           str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert book.returncode == 0, book.stdout[-3000:] + book.stderr[-3000:]
    return run_dir, run_dir / "book" / "_build" / "html"
