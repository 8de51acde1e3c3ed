"""Tables and text views of a rule-extraction run, for the extraction chapter (no logic of the method)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from ..artifacts import read_json
from ..extraction.pipeline import ExtractionResult, diff_rule_sets, step_table
from ..extraction.templates import PromptTemplate, explain_messages
from ..extraction.sampling import Example, serialize_conversation


def client_banner(cfg) -> None:
    model = "recorded responses (no model)" if cfg.llm == "replay" else cfg.model
    print(f"client: {cfg.llm} | model: {model} | rules extracted from the {cfg.extract_from}"
          f"{' chain' if cfg.extract_from == 'reasoning' else ''} | num_proc {cfg.num_proc}")
    if cfg.llm == "replay":
        print("\n*** DEMONSTRATION RESPONSES ***\nEvery explanation, reasoning chain and rule list in this chapter "
              f"is replayed from {Path(cfg.replay_file).name}: hand-written for the smoke fixture, NOT output of "
              "DeepSeek-R1 or any other model. They show the mechanics; they say nothing about the method's results.")


def samples_table(examples: list[Example]) -> pd.DataFrame:
    rows = []
    for e in examples:
        s = e.source
        rows.append({"example_id": e.example_id, "winner shown as": e.winner_letter,
                     **{k: s.get(k, "") for k in ("question_id", "judge", "turn")},
                     "A/B swapped": s.get("swapped", ""), "first user turn": e.conversation_a[0]["content"][:60]})
    return pd.DataFrame(rows).set_index("example_id")


def _block(title: str, text: str | None, width: int = 110, max_chars: int = 1500) -> None:
    text = text or "(none)"
    if len(text) > max_chars:
        text = text[:max_chars] + f" [... {len(text) - max_chars} more characters]"
    print(f"\n=== {title} ===")
    for para in text.splitlines():
        print(textwrap.fill(para, width) if para.strip() else "")


def show_example(record: dict, templates: dict[str, PromptTemplate]) -> None:
    """One example through the three-step pipeline: what went in and what came out."""
    conv = record["conversations"]
    ex = Example(record["example_id"], conv["conversation_a"], conv["conversation_b"], record["winner"],
                 record["source"])
    print(f"example {record['example_id']}: winner {record['winner']} (Assistant {record['winner_letter']})"
          + ("  [demonstration response]" if record.get("demonstration") else ""))
    _block("Assistant A (serialised as the explain prompt shows it)", serialize_conversation(ex.conversation_a))
    _block("Assistant B", serialize_conversation(ex.conversation_b))
    print(f"\n(explain prompt: {len(explain_messages(ex, templates)[0]['content'])} characters, "
          f"template {templates['explain'].version}, one user message, no system prompt)")
    _block("Step 1 (explain) output: reasoning chain", record["reasoning"])
    _block("Step 1 (explain) output: final explanation", record["explanation"])
    _block("Step 2 (extract) answer (raw text)", record["extract_answer"])
    print(f"\n=== Step 2 (extract) parsed: {record['status']} ===")
    if record["status"] == "ok":
        for r in record["extracted_rules"]:
            print(" -", r)
        if record["parse_repairs"]:
            print("repairs:", ", ".join(record["parse_repairs"]))
    else:
        print(f"failed at {record['failed_stage']}: {record['failure_reason']} {record['failure_detail']}")


def rules_per_example(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"example_id": r["example_id"], "status": r["status"],
                          "rules": len(r["extracted_rules"]) if r["extracted_rules"] is not None else "-",
                          "repairs": ", ".join(r["parse_repairs"]) or "",
                          "failure": r["failure_reason"] or "",
                          "stop reasons": ", ".join(f"{k}={v}" for k, v in r["stop_reasons"].items())}
                         for r in records]).set_index("example_id")


def merge_summary(result: ExtractionResult) -> pd.DataFrame:
    m = result.report["merge"]
    return pd.DataFrame([{"candidate rules": m["candidate_rules"], "after exact de-duplication": m["unique_rules"],
                          "after the merge call": m["merged_rules"], "kept": f"{m['kept_fraction']:.0%}"}],
                         index=[result.report["dataset"]])


def rule_set(output_dir: str | Path) -> None:
    """The saved rule set, numbered, with its hash and provenance summary."""
    rs = read_json(Path(output_dir) / "rules.json", made_by="02")
    p = rs["provenance"]
    print(f"{rs['num_rules']} rules | sha256 {rs['rule_set_hash'][:16]}... | client {p['llm']['provider']}, "
          f"model {p['llm']['model']}{' (DEMONSTRATION responses)' if p['llm']['demonstration_responses'] else ''}")
    print(f"prompt templates {', '.join(v['version'] for v in p['prompt_templates'].values())} | rules from "
          f"{len(p['rules_from_examples'])} of {len(p['source_examples'])} sampled examples | seeds and sample: "
          + ", ".join(f"{k}={v}" for k, v in p["sample"].items() if k != "source"))
    for i, rule in enumerate(rs["rules"], 1):
        print(f"{i:3d}. {rule}")


def failures_table(reports: list[dict]) -> pd.DataFrame:
    rows = [{"dataset": r["dataset"], **f} for r in reports for f in r["failures"]]
    if not rows:
        return pd.DataFrame([{"dataset": "-", "example_id": "no failures"}])
    return pd.DataFrame(rows).set_index(["dataset", "example_id"])


def step_costs(report: dict, note: bool = True) -> pd.DataFrame:
    """Per-step counts, tokens, latency and cost; cost counts every answer used, cached ones included."""
    if note and report["provenance"]["llm"]["demonstration_responses"]:
        print("Replayed demonstration responses: token counts are estimates (characters / 4) and the cost is "
              "what such calls would cost at the configured price; nothing was spent.")
    df = pd.DataFrame(step_table(report)).set_index("step")
    df.loc["total"] = df[["items", "succeeded", "failed", "repaired", "retries", "calls_made", "cache_hits",
                          "input_tokens", "output_tokens"]].sum()
    if df["cost_usd"].notna().any():
        df.loc["total", "cost_usd"] = df["cost_usd"].iloc[:-1].sum()
    return df


def compare_with_previous(output_dir: str | Path) -> pd.DataFrame | None:
    """Rules added/removed since the previous run into the same folder (rules.previous.json)."""
    out = Path(output_dir)
    prev_path = out / "rules.previous.json"
    if not prev_path.exists():
        print(f"{out.name}: no previous run in this folder; re-run the chapter (or change a setting) to compare.")
        return None
    prev, new = read_json(prev_path), read_json(out / "rules.json")
    d = diff_rule_sets(prev["rules"], new["rules"])
    same = prev["rule_set_hash"] == new["rule_set_hash"]
    print(f"{out.name}: previous {prev['rule_set_hash'][:12]} ({prev['provenance']['created_at']}) -> "
          f"this run {new['rule_set_hash'][:12]}: " + ("identical rule set" if same else
          f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['kept'])} kept"))
    rows = [{"change": k, "rule": r} for k in ("added", "removed") for r in d[k]]
    return pd.DataFrame(rows) if rows else None
