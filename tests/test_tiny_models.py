import hashlib

import pytest

from autorule_lib.config import TinyModelConfig
from autorule_lib.text_format import policy_prompt, policy_text, verifier_conversation
from autorule_lib.smoke.models import BOS, EOS, build_tiny_llama, build_tiny_tokenizer

CORPUS = [f"The answer to question {i} is {i * 7}. Always explain your reasoning clearly." for i in range(200)]
CFG = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seed=3)


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = []
    for run in ("a", "b"):
        d = tmp_path_factory.mktemp(run)
        tok = build_tiny_tokenizer(reversed(CORPUS) if run == "b" else CORPUS, CFG, d / "tok")
        build_tiny_llama(tok, CFG, d / "model")
        out.append(d)
    return out


def test_build_is_deterministic(built):
    a, b = built
    assert digest(a / "tok") == digest(b / "tok")  # corpus order does not matter
    assert digest(a / "model") == digest(b / "model")


def test_reloads_offline_with_llama_conventions(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0] / "model")
    model = AutoModelForCausalLM.from_pretrained(built[0] / "model")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id  # encode adds BOS, as Llama-3's tokenizer does
    text = policy_text("Q?", "A.", tok.eos_token)
    assert text == "<|user|>Q?<|assistant|>A. <|end_of_text|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.bos_token_id and ids[-1] == tok.eos_token_id  # no BOS, EOS is one token
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith(BOS) and chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_text_format_helpers():
    assert policy_prompt("Q") == "<|user|>Q<|assistant|>"
    assert verifier_conversation("Q", "A. <|end_of_text|>", EOS) == "<|user|>Q<|assistant|>A."


def test_unchanged_local_sources_are_not_reread(tmp_path, monkeypatch):
    """Every model lookup checks the build stamp; it re-reads the data only when a source file changed."""
    import os
    import shutil

    from autorule_lib.smoke import models as tiny_models
    from autorule_lib.profiles import load_profile

    smoke = load_profile("smoke")
    for name in ("ultrafeedback_source", "mt_bench_source"):
        src = smoke.data.__dict__[name]
        shutil.copytree(src, tmp_path / name)
        smoke.data.__dict__[name] = str(tmp_path / name)
    reads = []
    real = tiny_models.tiny_corpus
    monkeypatch.setattr(tiny_models, "tiny_corpus", lambda p: reads.append(1) or real(p))
    first, _ = tiny_models.corpus_digest(smoke)
    again, corpus = tiny_models.corpus_digest(smoke)
    assert (again, corpus, len(reads)) == (first, None, 1)
    jsonl = next(p for p in sorted((tmp_path / "mt_bench_source").rglob("*")) if p.is_file())
    stat = jsonl.stat()
    os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: it may have changed
    same, corpus = tiny_models.corpus_digest(smoke)
    assert (same, len(reads)) == (first, 2) and corpus is not None
