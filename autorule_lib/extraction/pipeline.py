"""Rule extraction (book/method.md §2): explain each preference, extract rules from the reasoning, merge them.

1. **Explain**: both conversations (``Role: content`` lines, Assistant A and B) and the verdict go to
   the reasoning model, which explains the preference; its chain of thought is kept.
2. **Extract**: the reasoning chain (paper; the released driver used the final explanation, kept as
   ``extraction.extract_from: explanation``) and the winner letter; answer = a JSON array of rules.
3. **Merge**: exact duplicates removed, then one call merges near-duplicates; answer = a JSON array.

Every call goes through the response cache, so a re-run makes calls only for what is not finished.
Nothing is dropped silently: each sampled example ends up in ``explanation_results.json`` as ``ok``
or ``failed`` with a reason, and an empty or failed merge raises ``ExtractionError``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import models
from ..artifacts import atomic_write_text, provenance, write_json
from ..cache import ResponseCache
from ..config import ExtractionConfig, Profile
from ..data.preparation import MT_SPLIT, load_source
from ..llm.base import LLMCallError, LLMClient, cached_complete
from ..llm.clients import make_client
from .parsing import parse_rule_list
from .sampling import Example, build_examples
from .templates import (
    STEPS,
    PromptTemplate,
    explain_messages,
    extract_messages,
    load_templates,
    merge_messages,
    template_versions,
)


class ExtractionError(RuntimeError):
    """The run produced no rule set (nothing to merge, or the merge failed); partial results are on disk."""


def unique_rules(records: list[dict]) -> list[str]:
    """Exact-string de-duplication of every extracted rule, first-seen order (stable across runs)."""
    return list(dict.fromkeys(r for rec in records if rec["status"] == "ok" for r in rec["extracted_rules"]))


# ---------------------------------------------------------------- calls and accounting

@dataclass
class StepStats:
    items: int = 0
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> count
    repaired: int = 0
    retries: int = 0
    calls_made: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latencies: list = field(default_factory=list)  # of calls made in this run

    def row(self, prices: tuple[float | None, float | None]) -> dict:
        p_in, p_out = prices
        cost = None if p_in is None or p_out is None else (self.input_tokens * p_in + self.output_tokens * p_out) / 1e6
        return {"items": self.items, "succeeded": self.succeeded, "failed": sum(self.failed.values()),
                "failed_by_reason": dict(self.failed), "repaired": self.repaired, "retries": self.retries,
                "calls_made": self.calls_made, "cache_hits": self.cache_hits, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "latency_s_mean": round(float(np.mean(self.latencies)), 3) if self.latencies else None,
                "latency_s_max": round(max(self.latencies), 3) if self.latencies else None,
                "cost_usd": None if cost is None else round(cost, 4)}


class Caller:
    """Cached, counted calls for one run; thread-safe."""

    def __init__(self, client: LLMClient, cache: ResponseCache, templates: dict[str, PromptTemplate]):
        self.client, self.cache, self.templates = client, cache, templates
        self.stats = {s: StepStats() for s in STEPS}
        self._lock = threading.Lock()

    def call(self, step: str, messages: list[dict], sample_index: int = 0):
        """(response, None) or (None, "call_failed:<reason>", detail)."""
        extra = {"template": f"{step}@{self.templates[step].version}"}
        try:
            resp, cached = cached_complete(self.client, self.cache, messages, sample_index=sample_index, extra=extra)
        except LLMCallError as e:
            with self._lock:
                self.stats[step].retries += e.retries
                self.stats[step].calls_made += 1
            return None, f"call_failed:{e.reason}", str(e)
        with self._lock:
            st = self.stats[step]
            st.cache_hits += cached
            st.calls_made += not cached
            st.retries += 0 if cached else resp.retries
            st.input_tokens += resp.usage.get("input_tokens", 0)
            st.output_tokens += resp.usage.get("output_tokens", 0)
            if not cached:
                st.latencies.append(resp.latency_s)
        return resp, None, ""

    def outcome(self, step: str, reason: str | None, repaired: bool = False) -> None:
        with self._lock:
            st = self.stats[step]
            st.items += 1
            if reason:
                st.failed[reason] += 1
            else:
                st.succeeded += 1
                st.repaired += repaired


def process_example(ex: Example, caller: Caller, extract_from: str, sample_index: int = 0) -> dict:
    """Explain, then extract; the record says what happened, including why it failed."""
    rec = {"example_id": ex.example_id, "winner": ex.winner, "winner_letter": ex.winner_letter, "status": "failed",
           "failed_stage": None, "failure_reason": None, "failure_detail": "", "explanation": None, "reasoning": None,
           "extracted_rules": None, "extract_answer": None, "parse_repairs": [], "stop_reasons": {},
           "source": ex.source, "conversations": {"conversation_a": ex.conversation_a,
                                                  "conversation_b": ex.conversation_b}}

    def fail(step, reason, detail=""):
        caller.outcome(step, reason)
        rec.update(failed_stage=step, failure_reason=reason, failure_detail=detail)
        return rec

    resp, reason, detail = caller.call("explain", explain_messages(ex, caller.templates), sample_index)
    if reason:
        return fail("explain", reason, detail)
    rec.update(explanation=resp.text, reasoning=resp.reasoning)
    rec["stop_reasons"]["explain"] = resp.stop_reason
    source_text = resp.reasoning if extract_from == "reasoning" else resp.text
    if not (source_text or "").strip():
        why = "no_reasoning_chain" if extract_from == "reasoning" else "empty_explanation"
        return fail("explain", why, f"the explain answer has no {extract_from} to extract rules from")
    caller.outcome("explain", None)

    resp, reason, detail = caller.call("extract", extract_messages(source_text, ex.winner_letter, caller.templates),
                                       sample_index)
    if reason:
        return fail("extract", reason, detail)
    rec["extract_answer"] = resp.text
    rec["stop_reasons"]["extract"] = resp.stop_reason
    parsed = parse_rule_list(resp.text)
    if not parsed.ok:
        return fail("extract", f"parse_failed:{parsed.error}", parsed.detail)
    caller.outcome("extract", None, repaired=bool(parsed.repairs))
    rec.update(status="ok", extracted_rules=parsed.rules, parse_repairs=parsed.repairs)
    return rec


# ---------------------------------------------------------------- the run

@dataclass
class ExtractionResult:
    output_dir: Path
    records: list[dict]
    unique_rules: list[str]
    merged_rules: list[str] | None
    report: dict

    @property
    def rule_set_hash(self) -> str | None:
        return rule_set_hash(self.merged_rules) if self.merged_rules else None


def rule_set_hash(rules: list[str]) -> str:
    """SHA-256 of the rules as a JSON array, in order (the order the verifier asks them in)."""
    return hashlib.sha256(json.dumps(rules, ensure_ascii=False).encode()).hexdigest()


def diff_rule_sets(old: list[str], new: list[str]) -> dict[str, list[str]]:
    return {"added": [r for r in new if r not in set(old)], "removed": [r for r in old if r not in set(new)],
            "kept": [r for r in new if r in set(old)]}


def _sample_indices(examples: list[Example], templates) -> list[int]:
    """Identical prompts (same pair judged twice) get distinct sample indices: independent answers."""
    seen: Counter = Counter()
    out = []
    for ex in examples:
        key = json.dumps(explain_messages(ex, templates), sort_keys=True)
        out.append(seen[key])
        seen[key] += 1
    return out


def write_results_tsv(path: Path, records: list[dict]) -> None:
    cols = ["example_id", "status", "failed_stage", "failure_reason", "winner", "num_rules", "extracted_rules",
            "explanation", "reasoning"]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(cols)
    for r in records:
        rules = r["extracted_rules"]
        w.writerow([r["example_id"], r["status"], r["failed_stage"] or "", r["failure_reason"] or "", r["winner"],
                    len(rules) if rules is not None else "", json.dumps(rules, ensure_ascii=False) if rules is not None
                    else "", r["explanation"] or "", r["reasoning"] or ""])
    atomic_write_text(path, buf.getvalue())


def run_extraction(examples: list[Example], client: LLMClient, output_dir: str | Path, profile: Profile, *,
                   dataset: str, cfg: ExtractionConfig | None = None, cache: ResponseCache | None = None,
                   templates: dict[str, PromptTemplate] | None = None, sample_info: dict | None = None,
                   progress: bool = True) -> ExtractionResult:
    """The three steps over ``examples``; writes every output file, raises ExtractionError without a rule set."""
    import os

    from tqdm import tqdm

    cfg = cfg or profile.extraction
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    templates = templates or load_templates(cfg.prompts_dir)
    cache = cache or ResponseCache(out / "llm_cache.sqlite")
    caller = Caller(client, cache, templates)
    indices = _sample_indices(examples, templates)
    records: list[dict | None] = [None] * len(examples)
    with ThreadPoolExecutor(max_workers=max(1, cfg.num_proc)) as pool:
        futures = {pool.submit(process_example, ex, caller, cfg.extract_from, si): i
                   for i, (ex, si) in enumerate(zip(examples, indices))}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"{dataset}: explain+extract",
                        disable=not progress or bool(os.environ.get("TQDM_DISABLE"))):  # the runner's kernels
            records[futures[fut]] = fut.result()
    demonstration = client.provider == "replay"
    for rec in records:
        rec["demonstration"] = demonstration

    candidates = [r for rec in records if rec["status"] == "ok" for r in rec["extracted_rules"]]
    uniq = unique_rules(records)
    merged, merge_error = None, None
    merge_log = {"answer": None, "stop_reason": None, "repairs": []}
    if not uniq:
        merge_error = "no_rules_to_merge"
        caller.outcome("merge", merge_error)
    else:
        resp, reason, detail = caller.call("merge", merge_messages(uniq, templates))
        if reason:
            merge_error = f"{reason} ({detail})"
            caller.outcome("merge", reason)
        else:
            parsed = parse_rule_list(resp.text)
            merge_log.update(answer=resp.text, stop_reason=resp.stop_reason, repairs=parsed.repairs)
            if not parsed.ok:
                merge_error = f"parse_failed:{parsed.error} ({parsed.detail})"
                caller.outcome("merge", f"parse_failed:{parsed.error}")
            elif not parsed.rules:
                merge_error = "empty_merge: the merge answer was an empty array"
                caller.outcome("merge", "empty_merge")
            else:
                merged = list(dict.fromkeys(parsed.rules))
                caller.outcome("merge", None, repaired=bool(parsed.repairs))

    prices = (cfg.price_input_per_mtok, cfg.price_output_per_mtok)
    prov = provenance(
        profile, "rule_extraction", dataset=dataset, extract_from=cfg.extract_from,
        llm={"provider": client.provider, "model": client.model, "demonstration_responses": demonstration},
        prompt_templates=template_versions(templates), sample=sample_info or {},
        source_examples=[{"example_id": r["example_id"], "status": r["status"], **r["source"]} for r in records])
    report = {
        "dataset": dataset, "status": "ok" if merged else "failed", "error": merge_error,
        "examples": len(records), "examples_ok": sum(r["status"] == "ok" for r in records),
        "stages": {s: caller.stats[s].row(prices) for s in STEPS},
        "failures": [{k: r[k] for k in ("example_id", "failed_stage", "failure_reason", "failure_detail")}
                     for r in records if r["status"] != "ok"],
        "merge": {"candidate_rules": len(candidates), "unique_rules": len(uniq),
                  "merged_rules": len(merged) if merged else 0,
                  "kept_fraction": round(len(merged) / len(candidates), 4) if merged else None, **merge_log},
        "price_usd_per_million_tokens": {"input": prices[0], "output": prices[1]},
        "provenance": prov,
    }
    _write_outputs(out, records, merged, report, prov)
    result = ExtractionResult(out, records, uniq, merged, report)
    if not merged:
        raise ExtractionError(f"{dataset}: no rule set produced: {merge_error}; "
                              f"{report['examples_ok']}/{len(records)} examples ok, see {out / 'report.json'}")
    return result


def _write_outputs(out: Path, records, merged, report, prov) -> None:
    write_json(out / "explanation_results.json", records)
    write_results_tsv(out / "explanation_results.tsv", records)
    previous = out / "rules.json"
    if previous.exists():  # keep the last run's rule set so the chapter can show what changed
        (out / "rules.previous.json").write_text(previous.read_text(encoding="utf-8"), encoding="utf-8")
    if merged:
        write_json(out / "merged_rules.json", merged)
        write_json(previous, {"rules": merged, "num_rules": len(merged), "rule_set_hash": rule_set_hash(merged),
                              "provenance": {**prov, "rules_from_examples": [r["example_id"] for r in records
                                                                             if r["status"] == "ok"]}})
    else:  # never leave an older rule set looking like this run's result
        (out / "merged_rules.json").unlink(missing_ok=True)
        previous.unlink(missing_ok=True)
    write_json(out / "report.json", report)


def extract_rules(profile: Profile, dataset: str, rows: list[dict], output_dir: str | Path, *,
                  cfg: ExtractionConfig | None = None, client: LLMClient | None = None,
                  cache_path: str | Path | None = None, source: str = "", split: str = "",
                  train_questions_only: bool = False, progress: bool = True) -> ExtractionResult:
    """Sample ``rows``, run the three steps and write the outputs to ``output_dir``."""
    cfg = cfg or profile.extraction
    examples, info = build_examples(profile, dataset, rows, cfg=cfg, split=split,
                                    train_questions_only=train_questions_only)
    if not examples:
        raise ExtractionError(f"{dataset}: no examples to explain in {source or 'the given rows'} ({split})")
    info["source"] = source
    client = client or make_client(cfg, device=models.pick_device(profile))  # a local extractor runs on the profile's device
    cache = ResponseCache(cache_path or Path(output_dir) / "llm_cache.sqlite")
    return run_extraction(examples, client, output_dir, profile, dataset=dataset, cfg=cfg, cache=cache,
                          sample_info=info, progress=progress)


def extract_rules_from_source(profile: Profile, dataset: str, source: str, output_dir: str | Path, *,
                              split: str | None = None, **kwargs) -> ExtractionResult:
    """The CLI path: read ``train_prefs`` (uf) or ``human`` (mt, training questions only) from a source.

    UF reads all of ``train_prefs`` (the original's pool); ``extraction.uf_sample_pool: filtered`` needs
    the prepared sets as source and ``--split rm_train``, since a raw source has no filtered split."""
    if dataset == "uf" and profile.extraction.uf_sample_pool == "filtered" and split != "rm_train":
        raise ExtractionError("extraction.uf_sample_pool is 'filtered': pass the data chapter's prepared sets "
                              "(.../01_data_preparation/ultrafeedback/sets) as --source and --split rm_train")
    split = split or ("train_prefs" if dataset == "uf" else MT_SPLIT)
    rows = load_source(source, [split])[split]
    return extract_rules(profile, dataset, rows, output_dir, source=source, split=split,
                         train_questions_only=dataset == "mt", **kwargs)


def step_table(report: dict) -> list[dict]:
    """Per-step token/cost/latency rows of a report (for a DataFrame); the report file keeps them under "stages"."""
    return [{"step": s, **{k: v for k, v in row.items() if k != "failed_by_reason"}}
            for s, row in report["stages"].items()]


def with_overrides(cfg: ExtractionConfig, **overrides) -> ExtractionConfig:
    """A copy of ``cfg`` with the given non-None fields replaced (CLI flags)."""
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
