"""Rule-extraction concurrency and resume benchmark against a loopback server with fixed latency.

Runs the same extraction (explain + extract per pair, one merge) with ``--num-proc 1`` and with
``--num-proc N`` against an OpenAI-compatible server on 127.0.0.1 that answers every request after a
fixed delay, then re-runs the N-worker extraction over its own cache and counts the requests the
server saw. The last line reads ``concurrency_speedup=<x> cached_rerun_calls=<n>``.

    .venv/bin/python -m benchmarks.extraction_concurrency --num-proc 8

Run it as a module from the repository root: its server is the test suite's (``tests/loopback_server.py``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from autorule_lib.profiles import load_profile
from autorule_lib.extraction.pipeline import extract_rules, with_overrides
from tests.loopback_server import LoopbackChatServer, extraction_responder


def synthetic_pairs(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"Question {i}: how should I organise task number {i}?"
        rows.append({"prompt": prompt, "prompt_id": f"bench-{i}",
                     "chosen": [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": f"Start with step one of task {i}, then..."}],
                     "rejected": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": "Just do it."}]})
    return rows


def timed_run(profile, rows, out: Path, url: str, num_proc: int) -> float:
    cfg = with_overrides(profile.extraction, llm="openai", base_url=url, model="loopback", num_proc=num_proc,
                         uf_num_examples=len(rows), requests_per_minute=None, tokens_per_minute=None)
    t0 = time.perf_counter()
    extract_rules(profile, "uf", rows, out, cfg=cfg, progress=False)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-proc", type=int, default=8)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server waits before each answer")
    args = ap.parse_args()
    profile = load_profile("smoke")
    rows = synthetic_pairs(args.examples)
    calls = 2 * args.examples + 1
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.examples} pairs -> {calls} calls per run; server latency {args.latency:.3f} s per request")
    with tempfile.TemporaryDirectory() as tmp, \
            LoopbackChatServer(extraction_responder(), latency_s=args.latency, max_requests=4 * calls) as srv:
        serial = timed_run(profile, rows, Path(tmp) / "serial", srv.url, 1)
        hits_serial = srv.hits
        parallel = timed_run(profile, rows, Path(tmp) / "parallel", srv.url, args.num_proc)
        hits_parallel = srv.hits - hits_serial
        before = srv.hits
        rerun = timed_run(profile, rows, Path(tmp) / "parallel", srv.url, args.num_proc)
        cached_calls = srv.hits - before
    print(f"num_proc=1: {serial:.2f} s, {hits_serial} requests")
    print(f"num_proc={args.num_proc}: {parallel:.2f} s, {hits_parallel} requests")
    print(f"cached re-run (num_proc={args.num_proc}): {rerun:.2f} s, {cached_calls} requests")
    print(f"concurrency_speedup={serial / parallel:.2f} cached_rerun_calls={cached_calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
