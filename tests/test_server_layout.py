"""The verifier as a server: the vLLM-server backend against a fake that answers like vLLM 0.27.1's
/v1/completions (backed by the trained tiny judge, so its probabilities are real), and the smoke book's
chapters 03-06 under the README's server layout against a real `transformers serve` on loopback."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from autorule_lib.profiles import load_profile
from loopback_server import LoopbackChatServer
from autorule_lib.verify.verifier import RuleVerifier
from autorule_lib.verify.prompt import load_template, messages_conversation, prompt_token_ids
from autorule_lib.verify.server import VLLMServerBackend, top_token_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = ["The assistant's responses should be factually correct.",
         "The assistant's responses should avoid repeating themselves.",
         "The assistant's responses should be polite."]


@pytest.fixture(scope="module")
def smoke():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def local_judge(smoke, models_dir):
    from autorule_lib.verify.verifier import build_verifier

    return build_verifier(smoke, models_dir, use_cache=False)


@pytest.fixture(scope="module")
def conversations(smoke):
    from autorule_lib.data.preparation import load_source

    rows = load_source(smoke.data.ultrafeedback_source, ["test_prefs"])["test_prefs"]
    convs = [messages_conversation(r[s][:2]) for r in rows for s in ("chosen", "rejected")]
    return [c for c in convs if len(c) < 1500][:6]


def vllm_like_responder(backend, served_model: str):
    """/v1/completions as vLLM 0.27.1 answers it (entrypoints/openai/completion/{protocol,serving}.py):
    prompts as token-id lists, one choice per prompt with its index, ``logprob_token_ids`` needing
    ``logprobs``, top log-probabilities of the first position keyed "token_id:N" when
    ``return_tokens_as_token_ids`` (else by decoded text), the sampled token among them."""
    import torch

    lock = threading.Lock()
    model, tok = backend.model, backend.tok

    def respond(body):
        if body.get("model") != served_model:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}, {}
        prompts = body["prompt"]
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) for p in prompts)):
            return 400, {"error": {"message": "expected a batch of token-id prompts"}}, {}
        if body.get("logprob_token_ids") and body.get("logprobs") is None:
            return 400, {"error": {"message": "when using `logprob_token_ids`, `logprobs` must be set."}}, {}
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        name = (lambda t: f"token_id:{t}") if as_ids else tok.decode
        choices = []
        with lock, torch.inference_mode():
            for i, ids in enumerate(prompts):
                if body.get("max_tokens", 16) == 1:
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                    sampled = int(logp.argmax())
                    wanted = body.get("logprob_token_ids") or logp.topk(body.get("logprobs") or 0).indices.tolist()
                    top = {name(t): float(logp[t]) for t in [sampled, *wanted]}
                    choices.append({"index": i, "text": tok.decode([sampled]), "finish_reason": "length",
                                    "logprobs": {"tokens": [name(sampled)], "token_logprobs": [float(logp[sampled])],
                                                 "top_logprobs": [top], "text_offset": [0]}})
                else:
                    text = backend._generate_batch([ids], body["max_tokens"])[0]
                    choices.append({"index": i, "text": text, "finish_reason": "stop", "logprobs": None})
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": served_model, "choices": choices}, {}

    return respond


@pytest.mark.parametrize("layout", ["rule_first", "conversation_first"])
def test_fast_mode_through_a_vllm_like_server_matches_the_local_judge(local_judge, conversations, layout):
    local = local_judge.variant(mode="fast", layout=layout)
    with LoopbackChatServer(vllm_like_responder(local_judge.backend, "tiny-verifier")) as server:
        remote_backend = VLLMServerBackend(server.url, "tiny-verifier", local_judge.backend.tok, num_workers=2)
        remote = RuleVerifier(remote_backend, local.template, local.cfg, "server", "fast")
        got = remote.verify(conversations, RULES)
        body = server.requests[0]
    want = local.verify(conversations, RULES)
    pairs = [(a, b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)]
    assert all(a.value is not None for a, _ in pairs)
    # Same verdict and P(Yes | Yes or No) wherever the local judge scored (it also weighs P(answer prefix),
    # which the server path takes as 1, so it may leave a few unscored that the server path scores).
    scored = [(a, b) for a, b in pairs if b.value is not None]
    assert len(scored) >= len(pairs) // 2 and {b.value for _, b in scored} == {0, 1}
    assert all(a.value == b.value and abs(a.p_yes - b.p_yes) < 1e-3 for a, b in scored)
    answer = local_judge.backend.answer
    assert body["max_tokens"] == 1 and body["logprob_token_ids"] == [answer.yes, answer.no]
    assert body["return_tokens_as_token_ids"] is True and body["temperature"] == 0.0
    # the prompts are exactly the local backend's token ids (no BOS or template added by the server)
    items = [(c, r) for c in conversations for r in RULES]
    local_ids = {tuple(x + list(answer.prefix)) for x in prompt_token_ids(
        local_judge.backend.tok, local.template, items, None, local_judge.backend.pieces)}
    sent = {tuple(p) for b in server.requests for p in b["prompt"]}
    assert sent == local_ids
    # sorted by token ids: the rules of one conversation go back to back (prefix-cache hits on the server)
    assert [list(p) for p in body["prompt"]] == sorted(body["prompt"])


def test_parity_mode_through_the_server_generates_and_parses(local_judge, conversations):
    local = local_judge.variant(mode="parity", layout="rule_first")
    with LoopbackChatServer(vllm_like_responder(local_judge.backend, "tiny-verifier")) as server:
        remote = RuleVerifier(VLLMServerBackend(server.url, "tiny-verifier", local_judge.backend.tok), local.template,
                              local.cfg, "server", "parity")
        got = remote.verify(conversations[:3], RULES)
        assert server.requests[0]["max_tokens"] == local.cfg.max_new_tokens
    want = local.verify(conversations[:3], RULES)
    assert [[v.value for v in r] for r in got] == [[v.value for v in r] for r in want]


@pytest.mark.parametrize("respond,reason", [
    (lambda body: (503, {"error": "overloaded"}, {}), "backend_error: HTTP 503"),
    (lambda body: (200, {"choices": [{"index": i, "text": "[[Yes]]", "logprobs": None}
                                     for i in range(len(body["prompt"]))]}, {}), "no_logprobs"),
    (lambda body: (200, {"choices": []}, {}), "backend_error"),
])
def test_server_failures_are_unscored_never_zero(local_judge, conversations, respond, reason):
    with LoopbackChatServer(respond) as server:
        remote = RuleVerifier(VLLMServerBackend(server.url, "m", local_judge.backend.tok), load_template("rule_first"),
                              local_judge.cfg, "server", "fast")
        row = remote.verify(conversations[:1], RULES)[0]
    assert all(v.value is None and v.reason.startswith(reason) for v in row)
    assert remote.stats["unscored"] == len(RULES)


def test_top_token_logprobs_reads_token_id_keys_only():
    choice = {"logprobs": {"top_logprobs": [{"token_id:5": -0.1, "token_id:7": -2.5, "Yes": -0.3}]}}
    assert top_token_logprobs(choice) == {5: -0.1, 7: -2.5}
    assert top_token_logprobs({"logprobs": None}) is None


def test_profile_selects_the_server_backend_in_fast_mode(tmp_path, models_dir):
    """`verifier.backend: vllm_server` builds a fast-capable verifier (the API backend refuses fast mode)."""
    from autorule_lib.verify.verifier import build_verifier

    prof = tmp_path / "server.yaml"
    prof.write_text(yaml.safe_dump({"extends": "smoke", "verifier": {
        "backend": "vllm_server", "mode": "fast", "api_base_url": "http://127.0.0.1:9/v1"}}))
    v = build_verifier(load_profile(str(prof)), models_dir, use_cache=False)
    assert v.backend.name == "vllm_server" and v.mode == "fast"
    assert v.backend.url == "http://127.0.0.1:9/v1/completions"
    row = v.verify(["<|user|>hi<|assistant|>hello"], RULES[:1])[0]  # nothing listens on port 9
    assert row[0].value is None and row[0].reason.startswith("backend_error")


# ---------------------------------------------------------------- a real OpenAI-compatible server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transformers_cli() -> list[str] | None:
    exe = Path(sys.executable).parent / "transformers"
    return [str(exe)] if exe.exists() else None


@pytest.mark.slow
def test_smoke_chapters_03_to_06_under_the_server_layout(tmp_path, smoke, models_dir):
    """README's server layout with a real OpenAI-compatible server: `transformers serve` (transformers' own
    FastAPI server) hosts the trained tiny verifier on 127.0.0.1; the profile points the verifier at it.
    Chapter 03 judges through it in parity mode and says that the fast-mode comparison is skipped; chapter
    06's rule reward calls it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    cli = _transformers_cli()
    if cli is None:
        pytest.skip("no `transformers` command in this environment")
    from autorule_lib.smoke.verifier import ensure_tiny_verifier

    verifier_dir = tmp_path / "served-verifier"
    shutil.copytree(ensure_tiny_verifier(smoke, models_dir), verifier_dir)
    port = _free_port()
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(cli + ["serve", str(verifier_dir), "--host", "127.0.0.1", "--port", str(port),
                                     "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"transformers serve did not come up: {(tmp_path / 'serve.log').read_text()[-2000:]}")
                time.sleep(1)
        profile = tmp_path / "server_layout.yaml"
        profile.write_text(yaml.safe_dump({
            "extends": "smoke", "name": "server_layout",
            "models": {"verifier": str(verifier_dir)},
            "verifier": {"backend": "openai", "api_base_url": f"http://127.0.0.1:{port}/v1", "num_workers": 2}}))
        run_env = {**env, "OPENAI_API_KEY": "unused-by-the-local-server"}
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "autorule_lib.book.cli", "run", "--profile", str(profile), "--output-dir", str(out),
               "--only", "00,01,02,03,04,05,06"]
        run = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        nb03 = json.loads(next((out / "notebooks").glob("03_*.ipynb")).read_text()) \
            if (out / "notebooks").exists() else None
        agreement = json.loads((out / "artifacts" / "03_rule_agreement" / "agreement.json").read_text())
        assert agreement["verifier"]["backend"] == "api"
        assert agreement["mode_agreement"] == {}  # skipped, not failed
        stats = agreement["verifier_stats"]["main"]
        assert stats["model_checks"] > 0 and stats.get("yes", 0) + stats.get("no", 0) > 0
        # chapter 06's rule reward called the server too: it answered more requests than chapter 03 made
        served = (tmp_path / "serve.log").read_text().count("[Request received]")
        assert served > stats["model_checks"]
        assert (out / "artifacts" / "06_grpo" / "autorule_uf").is_dir()
        if nb03 is not None:
            text = json.dumps(nb03)
            assert "Skipped: backend 'api' only generates" in text
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_chapter_03_with_a_served_tiny_verifier_name(tmp_path):
    """`models.verifier: tiny` with an API backend: chapter 03 used to read the local tiny verifier's record
    (FileNotFoundError, nothing is built locally in this layout); now it says where the verifier is served."""
    def respond(body):
        text = body["messages"][-1]["content"]
        verdict = "[[Yes]]" if hash(text) % 2 else "[[No]]"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict},
                                  "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, {}

    with LoopbackChatServer(respond, max_requests=5000, lifetime_s=1200) as server:
        profile = tmp_path / "served_tiny.yaml"
        profile.write_text(yaml.safe_dump({"extends": "smoke", "name": "served_tiny",
                                           "verifier": {"backend": "openai", "api_base_url": server.url}}))
        env = {**os.environ, "OPENAI_API_KEY": "unused", "no_proxy": "127.0.0.1,localhost",
               "NO_PROXY": "127.0.0.1,localhost", "PYTHONHASHSEED": "0"}
        out = tmp_path / "run"
        run = subprocess.run([sys.executable, "-m", "autorule_lib.book.cli", "run", "--profile", str(profile),
                              "--output-dir", str(out), "--only", "00,01,02,03"], env=env, capture_output=True,
                             text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert server.hits > 0
    assert not (out / "models" / "tiny-verifier-trained").exists()  # nothing local was built or read
    text = next((out / "notebooks").glob("03_*.ipynb")).read_text()
    assert "tiny verifier served at" in text and "Skipped: backend 'api' only generates" in text
