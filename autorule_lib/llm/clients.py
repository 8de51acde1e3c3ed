"""LLM clients behind one small interface: final text, reasoning chain, token usage and latency.

``make_client(cfg)`` returns one of: ``BedrockClient`` (boto3 ``converse``), ``OpenAICompatibleClient``
(any chat-completions server over HTTP), ``LocalClient`` (transformers, or vLLM's offline engine when
installed) or ``ReplayClient`` (recorded demonstration responses). Callers only use
``complete(messages, **params)``; ``cached_complete`` puts the response cache in front of it.

Every client shares one retry layer (bounded retries with exponential backoff and full jitter, for
throttling and transient errors only, counted per call) and an optional requests/tokens-per-minute
limiter. Secrets are read from the environment at call time and never stored on the client.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .. import models
from ..redaction import redact
from .base import (
    BaseClient,
    LLMCallError,
    LLMClient,
    LLMResponse,
    RateLimiter,
    RetryPolicy,
    TransientError,
    messages_key,
    split_reasoning,
)
from .. import engines

# ---------------------------------------------------------------- Amazon Bedrock

BEDROCK_TRANSIENT = {"ThrottlingException", "ServiceUnavailableException", "InternalServerException",
                     "ModelNotReadyException", "ModelTimeoutException", "TooManyRequestsException",
                     "RequestTimeout", "RequestTimeoutException"}


class BedrockClient(BaseClient):
    """``bedrock-runtime`` ``converse``; the chain of thought comes back in a ``reasoningContent`` block."""

    provider = "bedrock"

    def __init__(self, model: str = "us.deepseek.r1-v1:0", region: str = "us-east-1", read_timeout_s: int = 900,
                 retry_mode: str = "adaptive", botocore_max_attempts: int = 3, client=None, **base):
        super().__init__(model, **base)
        if client is None:
            import boto3
            from botocore.config import Config

            # botocore retries a few times underneath; our own layer adds bounded, counted retries on top
            config = Config(read_timeout=read_timeout_s, connect_timeout=60,
                            retries={"mode": retry_mode, "max_attempts": botocore_max_attempts})
            client = boto3.client("bedrock-runtime", region_name=region, config=config)
        self.client = client

    def _call(self, messages, params):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        params = dict(params)  # the retry loop passes the same dict again
        system = [{"text": m["content"]} for m in messages if m["role"] == "system"]
        convo = [{"role": m["role"], "content": [{"text": m["content"]}]} for m in messages if m["role"] != "system"]
        inference = {"temperature": params.pop("temperature"), "maxTokens": params.pop("max_tokens")}
        if "top_p" in params:
            inference["topP"] = params.pop("top_p")
        if "stop" in params:
            inference["stopSequences"] = list(params.pop("stop"))
        if params:
            raise ValueError(f"BedrockClient: unsupported parameters {sorted(params)}")
        kwargs = {"modelId": self.model, "messages": convo, "inferenceConfig": inference}
        if system:  # the method sends none; kept for other callers
            kwargs["system"] = system
        try:
            out = self.client.converse(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "ClientError")
            msg = redact(e.response.get("Error", {}).get("Message", str(e)))
            if code in BEDROCK_TRANSIENT:
                raise TransientError(code, msg) from None
            raise LLMCallError(code, msg) from None
        except NoCredentialsError:
            raise LLMCallError("no_credentials", "no AWS credentials in the environment "
                               "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
        except ReadTimeoutError as e:
            raise TransientError("timeout", str(e)) from None
        except BotoConnectionError as e:
            raise TransientError("connection_error", str(e)) from None
        except BotoCoreError as e:
            raise LLMCallError(type(e).__name__, str(e)) from None
        blocks = out.get("output", {}).get("message", {}).get("content", [])
        text = "".join(b["text"] for b in blocks if "text" in b)
        reasoning = "".join(b["reasoningContent"].get("reasoningText", {}).get("text", "")
                            for b in blocks if "reasoningContent" in b) or None
        if reasoning is None:
            text, reasoning = split_reasoning(text)
        usage = out.get("usage", {})
        return LLMResponse(text=text, reasoning=reasoning, stop_reason=out.get("stopReason"),
                           usage={"input_tokens": usage.get("inputTokens", 0),
                                  "output_tokens": usage.get("outputTokens", 0)})


# ---------------------------------------------------------------- OpenAI-compatible HTTP

TRANSIENT_HTTP = {408, 409, 425, 429, 500, 502, 503, 504, 529}


class OpenAICompatibleClient(BaseClient):
    """POST {base_url}/chat/completions (vLLM/SGLang ``serve``, hosted APIs)."""

    provider = "openai"

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", read_timeout_s: int = 900,
                 **base):
        super().__init__(model, **base)
        if not base_url:
            raise ValueError("OpenAICompatibleClient needs a base URL (--base-url / extraction.base_url)")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.api_key_env, self.read_timeout_s = api_key_env, read_timeout_s

    def _call(self, messages, params):
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:  # local servers usually need none
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.read_timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = redact(e.read()[:300].decode("utf-8", "replace"))
            retry_after = e.headers.get("Retry-After") if e.headers else None
            retry_after = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            if e.code in TRANSIENT_HTTP:
                raise TransientError(f"http_{e.code}", detail, retry_after) from None
            raise LLMCallError(f"http_{e.code}", detail) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
            reason = "timeout" if "timed out" in str(e) else "connection_error"
            raise TransientError(reason, str(e)) from None
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMCallError("bad_response", f"not a chat-completions answer: {raw[:200]!r}") from None
        text = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if not reasoning:
            text, reasoning = split_reasoning(text)
        usage = payload.get("usage") or {}
        return LLMResponse(text=text, reasoning=reasoning, stop_reason=choice.get("finish_reason"),
                           usage={"input_tokens": usage.get("prompt_tokens", 0),
                                  "output_tokens": usage.get("completion_tokens", 0)})


# ---------------------------------------------------------------- local models

class LocalClient(BaseClient):
    """A local chat model: vLLM's offline engine when importable (and asked for), else transformers."""

    provider = "local"

    def __init__(self, model: str, device: str = "cpu", engine: str = "auto", gpu_memory_utilization: float = 0.85,
                 **base):
        super().__init__(model, **base)
        self.device, self.engine, self.gpu_memory_utilization = device, engine, gpu_memory_utilization
        self._lock = threading.Lock()  # one generate at a time: the model is not re-entrant
        self._loaded = None

    def release(self) -> None:
        """Drop the model (``engines.make_room`` calls this before another model loads); reloaded when next used."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded[0] == "vllm":
            engines.shutdown_vllm(loaded[1])

    def _load(self):
        if self._loaded is None:
            engines.make_room(f"local:{self.model}")
            if models.pick_engine(self.engine, self.device) == "vllm":
                from vllm import LLM

                self._loaded = ("vllm", LLM(model=self.model, enable_prefix_caching=True,
                                            **engines.vllm_kwargs(self.gpu_memory_utilization)))
            else:
                # the checkpoint's own dtype, as this client always loaded (it has no profile to ask)
                model = models.load_causal_lm(self.model, self.device, None)
                self._loaded = ("transformers", (models.load_tokenizer(self.model), model))
            engines.register(f"local:{self.model}", self.release)
        return self._loaded

    def _call(self, messages, params):
        with self._lock:
            kind, obj = self._load()
            if kind == "vllm":
                from vllm import SamplingParams

                sp = SamplingParams(temperature=params["temperature"], max_tokens=params["max_tokens"],
                                    top_p=params.get("top_p", 1.0))
                out = obj.chat(messages, sp, use_tqdm=False)[0]
                raw, n_in, n_out = out.outputs[0].text, len(out.prompt_token_ids), len(out.outputs[0].token_ids)
            else:
                raw, n_in, n_out = self._generate_transformers(obj, messages, params)
        text, reasoning = split_reasoning(raw)
        return LLMResponse(text=text, reasoning=reasoning, usage={"input_tokens": n_in, "output_tokens": n_out},
                           stop_reason="length" if n_out >= params["max_tokens"] else "stop")

    def _generate_transformers(self, obj, messages, params):
        import torch

        tok, model = obj
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(self.device)
        n_in = inputs["input_ids"].shape[1]
        room = getattr(model.config, "max_position_embeddings", n_in + params["max_tokens"]) - n_in
        if room <= 0:
            raise LLMCallError("prompt_too_long", f"{n_in} prompt tokens exceed the model's context")
        sampling = params["temperature"] > 0
        gen = dict(max_new_tokens=min(params["max_tokens"], room), do_sample=sampling,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if sampling:
            gen.update(temperature=params["temperature"], top_p=params.get("top_p", 1.0))
        with torch.no_grad():
            out = model.generate(**inputs, **gen)
        new = out[0, n_in:]
        return tok.decode(new, skip_special_tokens=True), n_in, int(new.shape[0])


class ReplayClient(BaseClient):
    """Serves recorded responses by the content hash of the messages; never invents an answer.

    A JSONL record: {"key", "text", "reasoning", "usage", "stop_reason", ...}; a record with an
    "error" field replays a failed call.
    """

    provider = "replay"

    def __init__(self, path: str | Path, **base):
        self.path = Path(path)
        raw = self.path.read_bytes()
        super().__init__(f"replay:{self.path.name}@{hashlib.sha256(raw).hexdigest()[:12]}", **base)
        self.records: dict[str, dict] = {}
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from None
            if "key" not in rec:
                raise ValueError(f"{self.path}:{lineno}: record without a 'key'")
            if rec["key"] in self.records and self.records[rec["key"]] != rec:
                raise ValueError(f"{self.path}:{lineno}: two different recordings for key {rec['key'][:12]}")
            self.records[rec["key"]] = rec
        self.retry = RetryPolicy(max_retries=0)  # a replay never changes its answer

    def _call(self, messages, params):
        key = messages_key(messages)
        rec = self.records.get(key)
        if rec is None:
            raise LLMCallError("no_recording", f"no recorded response for this prompt (key {key[:12]}) in "
                               f"{self.path.name}; recordings match prompts exactly, re-record after edits")
        if rec.get("error"):
            raise LLMCallError(rec["error"], "a recorded failed call")
        return LLMResponse(text=rec.get("text", ""), reasoning=rec.get("reasoning"), usage=dict(rec.get("usage", {})),
                           stop_reason=rec.get("stop_reason", "end_turn"))


# ---------------------------------------------------------------- construction and caching

def make_client(cfg, *, llm: str | None = None, model: str | None = None, base_url: str | None = None,
                replay_file: str | None = None, boto_client=None, device: str | None = None,
                sleep: Callable[[float], None] = time.sleep) -> LLMClient:
    """A client from an ``ExtractionConfig``-like object; keyword arguments override its fields.

    Only ``llm`` and ``model`` are required on ``cfg``; the other settings fall back to the paper's.
    """
    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    kind = llm or get("llm")
    base = dict(temperature=get("temperature", 0.6), max_tokens=get("max_tokens", 32768), sleep=sleep,
                retry=RetryPolicy(get("max_retries", 6), get("backoff_base_s", 2.0), get("backoff_max_s", 60.0)))
    if get("requests_per_minute") or get("tokens_per_minute"):
        base["limiter"] = RateLimiter(get("requests_per_minute"), get("tokens_per_minute"), sleep=sleep)
    model = model or get("model")
    if kind == "bedrock":
        return BedrockClient(model, region=get("region", "us-east-1"), read_timeout_s=get("read_timeout_s", 900),
                             retry_mode=get("retry_mode", "adaptive"), client=boto_client, **base)
    if kind == "openai":
        return OpenAICompatibleClient(model, base_url or get("base_url"), api_key_env=get("api_key_env", "OPENAI_API_KEY"),
                                      read_timeout_s=get("read_timeout_s", 900), **base)
    if kind == "local":  # the caller's device (the profile's); without one, the GPU when there is one
        return LocalClient(model, device=device or models.default_device(),
                           gpu_memory_utilization=get("gpu_memory_utilization", 0.85), **base)
    if kind == "replay":
        path = replay_file or get("replay_file")
        if not path:
            raise ValueError("the replay client needs a recordings file (extraction.replay_file)")
        return ReplayClient(path, **base)
    raise ValueError(f"unknown LLM client {kind!r} (bedrock, openai, local, replay)")
