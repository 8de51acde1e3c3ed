"""A small OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It answers with scripted responses (never a model), counts every request, can add a fixed latency,
serves a bounded number of requests and shuts itself down after a lifetime, so a forgotten server
never outlives its test.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[dict], tuple[int, dict, dict]]  # request body -> (status, JSON payload, headers)


def chat_payload(content: str, reasoning: str | None = None, finish_reason: str = "stop",
                 reasoning_field: str = "reasoning_content", prompt_tokens: int = 0) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message[reasoning_field] = reasoning
    return {"id": "loopback", "object": "chat.completion", "model": "loopback",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens,
                      "completion_tokens": max(1, len(content + (reasoning or "")) // 4)}}


class LoopbackChatServer:
    def __init__(self, responder: Responder, latency_s: float = 0.0, max_requests: int = 10_000,
                 lifetime_s: float = 300.0):
        self.responder, self.latency_s, self.max_requests = responder, latency_s, max_requests
        self.requests: list[dict] = []  # bodies, in arrival order
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    over = len(server.requests) > server.max_requests
                time.sleep(server.latency_s)
                status, payload, headers = (503, {"error": "request budget exhausted"}, {}) if over \
                    else server.responder(body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (tests kill it on purpose)

            def log_message(self, *args):  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def hits(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> "LoopbackChatServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


RULE_POOL = [
    "The assistant's responses should answer the question in the first sentence.",
    "The assistant's responses should give a complete, working example when code is requested.",
    "The assistant's responses should stay within any length limit the user states.",
    "The assistant's responses should avoid unsupported factual claims.",
    "The assistant's responses should use a tone suited to the user's request.",
    "The assistant's responses should organise multi-part answers with headings or lists.",
]


def extraction_responder(templates=None) -> Responder:
    """Scripted answers for the three extraction prompts, chosen by a hash of the prompt (deterministic)."""
    from autorule_lib.extraction.templates import load_templates, step_of

    templates = templates or load_templates()

    def respond(body: dict) -> tuple[int, dict, dict]:
        messages = body.get("messages") or []
        stage = step_of(messages, templates) if messages else None
        text = messages[-1]["content"] if messages else ""
        h, n_in = _digest(text), len(text) // 4
        if stage == "explain":
            letter = "A" if "model_a means" in text and "verdict: model_a" in text else "B"
            reasoning = (f"Let me compare the two conversations. Assistant {letter} is more direct. "
                         f"Topic marker {h % len(RULE_POOL)}, case {h:08x}.")
            return 200, chat_payload(f"Assistant {letter} was preferred for its directness.", reasoning,
                                      prompt_tokens=n_in), {}
        if stage == "extract":
            rules = [RULE_POOL[h % len(RULE_POOL)], RULE_POOL[(h + 1) % len(RULE_POOL)]]
            return 200, chat_payload(json.dumps(rules), prompt_tokens=n_in), {}
        if stage == "merge":
            lines = [line[2:] for line in text.splitlines() if line.startswith("- ")]
            return 200, chat_payload(json.dumps(lines[: max(1, (len(lines) + 1) // 2)]), prompt_tokens=n_in), {}
        return 400, {"error": {"message": "unrecognised prompt"}}, {}

    return respond
