"""LLM clients: the real boto3 client under botocore's Stubber, the HTTP client against a loopback
server, the shared retry layer, the rate limiter, replay and the response cache."""
import json
import threading

import pytest
from botocore.stub import ANY, Stubber

from autorule_lib.cache import ResponseCache
from autorule_lib.config import ExtractionConfig
from autorule_lib.llm.clients import BedrockClient, OpenAICompatibleClient, ReplayClient, make_client
from autorule_lib.llm.base import LLMCallError, RateLimiter, RetryPolicy, cached_complete, messages_key, split_reasoning
from loopback_server import LoopbackChatServer, chat_payload

MESSAGES = [{"role": "user", "content": "Why was A preferred?"}]


class Sleeps(list):
    """Records backoff waits instead of sleeping."""

    def __call__(self, seconds):
        self.append(seconds)


@pytest.fixture
def aws_env(monkeypatch):
    # dummy credentials from the environment (never real ones); no instance-metadata lookups
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def converse_response(text, reasoning=None, stop="end_turn"):
    content = ([{"reasoningContent": {"reasoningText": {"text": reasoning, "signature": "sig"}}}] if reasoning else [])
    return {"output": {"message": {"role": "assistant", "content": content + [{"text": text}]}},
            "stopReason": stop, "usage": {"inputTokens": 120, "outputTokens": 340, "totalTokens": 460},
            "metrics": {"latencyMs": 1234}}


EXPECTED_PARAMS = {"modelId": "us.deepseek.r1-v1:0", "messages": [{"role": "user", "content": [{"text": ANY}]}],
                   "inferenceConfig": {"temperature": 0.6, "maxTokens": 32768}}  # and no "system": none is sent


def bedrock(sleeps, max_retries=3):
    return make_client(ExtractionConfig(llm="bedrock", max_retries=max_retries), sleep=sleeps)


def test_bedrock_client_settings_match_the_method(aws_env):
    client = bedrock(Sleeps())
    assert isinstance(client, BedrockClient)
    cfg = client.client.meta.config
    assert client.client.meta.region_name == "us-east-1"
    assert cfg.read_timeout == 900 and cfg.retries["mode"] in ("standard", "adaptive")
    assert client.default_params() == {"temperature": 0.6, "max_tokens": 32768}


def test_bedrock_reasoning_block_text_and_usage(aws_env):
    client = bedrock(Sleeps())
    with Stubber(client.client) as stub:
        stub.add_response("converse", converse_response("A is clearer.", "First, compare the openings..."),
                          EXPECTED_PARAMS)
        resp = client.complete(MESSAGES)
        stub.assert_no_pending_responses()
    assert resp.text == "A is clearer." and resp.reasoning == "First, compare the openings..."
    assert resp.usage == {"input_tokens": 120, "output_tokens": 340}
    assert resp.provider == "bedrock" and resp.model == "us.deepseek.r1-v1:0" and resp.retries == 0
    assert resp.stop_reason == "end_turn" and resp.latency_s > 0


def test_bedrock_throttling_then_success_is_retried_and_counted(aws_env):
    sleeps = Sleeps()
    client = bedrock(sleeps)
    with Stubber(client.client) as stub:
        stub.add_client_error("converse", "ThrottlingException", "Too many requests", 429)
        stub.add_client_error("converse", "ThrottlingException", "Too many requests", 429)
        stub.add_response("converse", converse_response("ok", "chain"), EXPECTED_PARAMS)
        resp = client.complete(MESSAGES)
        stub.assert_no_pending_responses()
    assert resp.text == "ok" and resp.retries == 2 and len(sleeps) == 2


def test_bedrock_persistent_failure_gives_up_after_bounded_retries(aws_env):
    sleeps = Sleeps()
    client = bedrock(sleeps, max_retries=2)
    with Stubber(client.client) as stub:
        for _ in range(3):
            stub.add_client_error("converse", "ServiceUnavailableException", "down", 503)
        with pytest.raises(LLMCallError) as e:
            client.complete(MESSAGES)
        stub.assert_no_pending_responses()  # exactly 1 + 2 attempts
    assert e.value.reason == "ServiceUnavailableException" and e.value.retries == 2 and len(sleeps) == 2


def test_bedrock_permanent_error_is_not_retried(aws_env):
    sleeps = Sleeps()
    client = bedrock(sleeps)
    with Stubber(client.client) as stub:
        stub.add_client_error("converse", "AccessDeniedException", "no model access", 403)
        with pytest.raises(LLMCallError) as e:
            client.complete(MESSAGES)
    assert e.value.reason == "AccessDeniedException" and e.value.retries == 0 and sleeps == []


def test_backoff_is_exponential_with_jitter_and_respects_retry_after():
    policy = RetryPolicy(max_retries=5, base_delay_s=1.0, max_delay_s=8.0)
    for attempt in range(6):
        for _ in range(50):
            assert 0 <= policy.delay(attempt) <= min(8.0, 2 ** attempt)
    assert policy.delay(0, retry_after=3.0) >= 3.0
    assert len({round(policy.delay(3), 6) for _ in range(20)}) > 1  # jittered, not a fixed schedule


# ---------------------------------------------------------------- OpenAI-compatible server on loopback

def scripted(*answers):
    """A responder that plays ``answers`` in order: (status, payload, headers)."""
    queue = list(answers)
    lock = threading.Lock()

    def respond(body):
        with lock:
            return queue.pop(0)
    return respond


def openai_client(url, sleeps, **kw):
    cfg = ExtractionConfig(llm="openai", model="deepseek-r1", base_url=url, api_key_env="AUTORULE_TEST_API_KEY",
                           max_retries=kw.pop("max_retries", 3), temperature=0.6, max_tokens=2048)
    return make_client(cfg, sleep=sleeps)


def test_openai_reasoning_content_usage_and_request_shape(monkeypatch):
    monkeypatch.setenv("AUTORULE_TEST_API_KEY", "sk-test-0123456789")
    with LoopbackChatServer(scripted((200, chat_payload("A wins.", "I compare both."), {})), max_requests=5) as srv:
        client = openai_client(srv.url, Sleeps())
        resp = client.complete(MESSAGES)
        body, headers = srv.requests[0], srv.headers[0]
    assert isinstance(client, OpenAICompatibleClient)
    assert resp.text == "A wins." and resp.reasoning == "I compare both." and resp.provider == "openai"
    assert body == {"model": "deepseek-r1", "messages": MESSAGES, "temperature": 0.6, "max_tokens": 2048}
    assert headers["Authorization"] == "Bearer sk-test-0123456789"  # from the env var named in the config
    assert "sk-test" not in json.dumps(vars(client), default=str)  # the key is not kept on the client


def test_openai_reasoning_field_and_think_tags(monkeypatch):
    monkeypatch.delenv("AUTORULE_TEST_API_KEY", raising=False)
    answers = [(200, chat_payload("B wins.", "chain two", reasoning_field="reasoning"), {}),
               (200, chat_payload("<think>inline chain</think>\nC wins."), {})]
    with LoopbackChatServer(scripted(*answers), max_requests=5) as srv:
        client = openai_client(srv.url, Sleeps())
        first, second = client.complete(MESSAGES), client.complete(MESSAGES)
        assert "Authorization" not in srv.headers[0]  # no key set: none sent (local servers)
    assert (first.text, first.reasoning) == ("B wins.", "chain two")
    assert (second.text, second.reasoning) == ("C wins.", "inline chain")
    assert split_reasoning("plain") == ("plain", None)


def test_openai_429_then_success_honours_retry_after():
    sleeps = Sleeps()
    answers = [(429, {"error": "slow down"}, {"Retry-After": "2"}), (200, chat_payload("done", "r"), {})]
    with LoopbackChatServer(scripted(*answers), max_requests=5) as srv:
        resp = openai_client(srv.url, sleeps).complete(MESSAGES)
        assert srv.hits == 2
    assert resp.text == "done" and resp.retries == 1 and sleeps[0] >= 2.0


def test_openai_persistent_5xx_and_permanent_4xx():
    sleeps = Sleeps()
    with LoopbackChatServer(scripted(*[(500, {"error": "boom"}, {})] * 3), max_requests=5) as srv:
        with pytest.raises(LLMCallError) as e:
            openai_client(srv.url, sleeps, max_retries=2).complete(MESSAGES)
        assert srv.hits == 3
    assert e.value.reason == "http_500" and e.value.retries == 2
    with LoopbackChatServer(scripted((401, {"error": "bad key"}, {})), max_requests=5) as srv:
        with pytest.raises(LLMCallError) as e:
            openai_client(srv.url, Sleeps()).complete(MESSAGES)
        assert srv.hits == 1
    assert e.value.reason == "http_401" and e.value.retries == 0


def test_openai_garbage_answer_is_a_failure_not_an_empty_text():
    with LoopbackChatServer(scripted((200, {"unexpected": True}, {})), max_requests=5) as srv:
        with pytest.raises(LLMCallError, match="bad_response"):
            openai_client(srv.url, Sleeps()).complete(MESSAGES)


def test_loopback_server_is_bounded():
    with LoopbackChatServer(scripted(*[(200, chat_payload("x"), {})] * 3), max_requests=1) as srv:
        client = openai_client(srv.url, Sleeps(), max_retries=0)
        client.complete(MESSAGES)
        with pytest.raises(LLMCallError, match="http_503"):
            client.complete(MESSAGES)


# ---------------------------------------------------------------- rate limit, replay, cache

def test_rate_limiter_requests_and_tokens_per_minute():
    now = [0.0]
    waits = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    lim = RateLimiter(requests_per_minute=2, clock=lambda: now[0], sleep=sleep)
    lim.acquire()
    lim.acquire()
    assert waits == []
    lim.acquire()  # the third request in a minute waits for the first to age out
    assert now[0] == pytest.approx(60.0)

    now[0], waits[:] = 0.0, []
    lim = RateLimiter(tokens_per_minute=1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(2):
        lim.acquire()
        lim.record_tokens(600)  # 1200 tokens in the window after the second
    lim.acquire()
    assert now[0] >= 60.0 and waits


def test_replay_serves_recordings_and_never_invents(tmp_path):
    path = tmp_path / "rec.jsonl"
    rec = {"key": messages_key(MESSAGES), "text": "recorded", "reasoning": "chain", "usage": {"input_tokens": 3},
           "demonstration": True}
    path.write_text(json.dumps(rec) + "\n")
    client = ReplayClient(path)
    resp = client.complete(MESSAGES)
    assert (resp.text, resp.reasoning, resp.provider) == ("recorded", "chain", "replay")
    assert client.model.startswith("replay:rec.jsonl@")  # names the recording file and its content hash
    with pytest.raises(LLMCallError) as e:
        client.complete([{"role": "user", "content": "something never recorded"}])
    assert e.value.reason == "no_recording"


class CountingClient:
    provider, model = "fake", "m"

    def __init__(self):
        self.calls = 0

    def default_params(self):
        return {"temperature": 0.6}

    def complete(self, messages, **params):
        from autorule_lib.llm.base import LLMResponse
        self.calls += 1
        return LLMResponse(text=f"answer {self.calls}", usage={"input_tokens": 1, "output_tokens": 2})


def test_cached_complete_keys_on_messages_params_and_sample_index(tmp_path):
    cache, client = ResponseCache(tmp_path / "c.sqlite"), CountingClient()
    a, hit = cached_complete(client, cache, MESSAGES)
    assert not hit and client.calls == 1
    b, hit = cached_complete(client, cache, MESSAGES)
    assert hit and b.text == a.text and client.calls == 1
    cached_complete(client, cache, MESSAGES, sample_index=1)
    cached_complete(client, cache, MESSAGES, temperature=0.0)
    assert client.calls == 3
    reopened = ResponseCache(tmp_path / "c.sqlite")  # survives the process
    assert cached_complete(client, reopened, MESSAGES)[1] and client.calls == 3


def test_cached_complete_makes_concurrent_identical_calls_once(tmp_path):
    cache, client = ResponseCache(tmp_path / "c.sqlite"), CountingClient()
    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_complete(client, cache, MESSAGES)[0].text))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.calls == 1 and set(results) == {"answer 1"}


def test_make_client_rejects_unknown_and_incomplete_settings():
    with pytest.raises(ValueError, match="unknown LLM client"):
        make_client(ExtractionConfig(), llm="carrier-pigeon")
    with pytest.raises(ValueError, match="base URL"):
        make_client(ExtractionConfig(llm="openai"))
    with pytest.raises(ValueError, match="recordings file"):
        make_client(ExtractionConfig(llm="replay"))


def test_local_client_generates_with_the_chat_template(tmp_path):
    from autorule_lib.config import TinyModelConfig
    from autorule_lib.smoke.models import build_tiny_llama, build_tiny_tokenizer

    cfg = TinyModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    tok = build_tiny_tokenizer([f"rule {i} says be concise and clear" for i in range(50)], cfg, tmp_path / "m")
    build_tiny_llama(tok, cfg, tmp_path / "m")
    client = make_client(ExtractionConfig(llm="local", temperature=0.0, max_tokens=5), model=str(tmp_path / "m"))
    resp = client.complete(MESSAGES)
    assert resp.provider == "local" and isinstance(resp.text, str)
    assert resp.usage["input_tokens"] > 0 and 0 < resp.usage["output_tokens"] <= 5
