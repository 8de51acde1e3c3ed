"""Rule-verifier throughput at K = 25 rules: paper-parity generation vs fast mode, prefix reuse vs re-encoding.

Same judge model, same conversations, same 25 rules, same batch size, verdict cache off. Timed:

  parity  rule_first          the paper: greedy generation, rule before the conversation
  parity  conversation_first  the same prompts as the two fast rows
  fast    conversation_first  one forward pass per (response, rule), every prompt encoded whole
  fast    conversation_first  the same with prefix reuse: the judge instructions encoded once per call,
                              each response's conversation once, each rule's suffix attending to them
                              (``autorule_lib/verify/shared_prefix.py``)

  fast_vs_parity_speedup = parity (conversation_first) seconds / fast with prefix reuse seconds
  prefix_reuse_speedup   = fast re-encoding seconds / fast with prefix reuse seconds

Each is the median of ``--repeats`` timed runs after one warm-up (taken round-robin over all settings),
at each of ``--batch-sizes``; every mode
keeps its best batch size (large padded batches are slower on a CPU, and not for every mode alike). All
in this one process. The run also prints how often the two modes agree on the verdicts it timed, and how
many prompt tokens each fast variant encodes: their ratio bounds the prefix-reuse speed-up, because every
rule still encodes its own line, the chat template's end and the forced answer start.

``--model tiny`` (default): the smoke profile's trained tiny verifier, on CPU. Its parity generation
stops after ``[[Yes]]``/``[[No]]`` and its end-of-turn token, as a real verifier does.
``--model llama8b-random``: a Llama-3-8B-shaped model with random weights in bf16 on CUDA (the compute of
the real verifier; needs a GPU). A random model never stops by itself, so its parity generation is capped
at the length of the answer plus end token — the tokens a real verifier generates before stopping.
``--conversation-tokens N`` lengthens every response until its conversation has N tokens (realistic judge
prompts); ``--device cpu --quick-shape`` runs the llama8b-random path at two narrow layers in fp32, as
the CPU rehearsal of ``benchmarks/gpu_check.py`` does.

The last line reads ``fast_vs_parity_speedup=<x> prefix_reuse_speedup=<y>``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from autorule_lib.profiles import load_profile
from autorule_lib.verify.verifier import RuleVerifier
from autorule_lib.verify.prompt import load_template, messages_conversation

RULES = [  # 25 rules in the style of extracted ones (the paper's UF set has 25)
    "The assistant's responses should answer the exact question that was asked.",
    "The assistant's responses should be factually accurate.",
    "The assistant's responses should be concise and avoid filler.",
    "The assistant's responses should use a polite and professional tone.",
    "The assistant's responses should give concrete examples where they help.",
    "The assistant's responses should show the steps of any calculation.",
    "The assistant's responses should state the final answer clearly.",
    "The assistant's responses should format code in code blocks.",
    "The assistant's responses should explain what provided code does.",
    "The assistant's responses should respect every constraint in the request, such as length or format.",
    "The assistant's responses should not repeat the same sentence or phrase.",
    "The assistant's responses should organise multi-part answers into lists or numbered steps.",
    "The assistant's responses should avoid unsupported claims and invented sources.",
    "The assistant's responses should acknowledge ambiguity and state assumptions.",
    "The assistant's responses should use terminology correctly and define it when needed.",
    "The assistant's responses should stay on topic.",
    "The assistant's responses should keep a consistent voice in role-play.",
    "The assistant's responses should recommend a professional for medical or legal risk.",
    "The assistant's responses should use correct grammar and spelling.",
    "The assistant's responses should adapt their register to the audience.",
    "The assistant's responses should mention relevant pitfalls or edge cases.",
    "The assistant's responses should not leave template placeholders in text meant to be sent.",
    "The assistant's responses should give specific, actionable next steps.",
    "The assistant's responses should verify their result when a check is possible.",
    "The assistant's responses should end with a brief summary when they are long.",
]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.system()} {platform.release()}; CPU {cpu}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}; GPU {gpu}; python {platform.python_version()}, torch {torch.__version__}")


def conversations(profile, tokenizer, n: int, max_tokens: int, target_tokens: int = 0) -> list[str]:
    """The first ``n`` UltraFeedback test conversations (chosen and rejected) under ``max_tokens`` tokens.

    With ``target_tokens``, each response is lengthened with the text of other fixture responses until its
    conversation has at least that many tokens (the fixtures' are short; the paper's judge sees responses of
    up to ~500 Llama-3 tokens), and ``max_tokens`` is not applied."""
    from autorule_lib.data.preparation import load_source

    rows = load_source(profile.data.ultrafeedback_source, ["test_prefs"])["test_prefs"]
    filler = [row[side][1]["content"] for row in rows for side in ("chosen", "rejected") if row[side][1]["content"]]
    count = lambda msgs: len(tokenizer(messages_conversation(msgs))["input_ids"])  # noqa: E731
    out = []
    for row in rows:
        for side in ("chosen", "rejected"):
            msgs = [dict(m) for m in row[side][:2]]
            k = 0
            while target_tokens and count(msgs) < target_tokens:
                msgs[1]["content"] += "\n\n" + filler[k % len(filler)]
                k += 1
            if (target_tokens or count(msgs) < max_tokens) and len(out) < n:
                out.append(messages_conversation(msgs))
    return out


def load_judge(args, profile):
    """(backend, stop-capped max_new_tokens) for the chosen model."""
    import torch

    from autorule_lib.smoke.models import ensure_tiny_models
    from autorule_lib.smoke.verifier import ensure_tiny_verifier
    from autorule_lib.verify.verdict import YES
    from autorule_lib.verify.verifier import load_local_judge
    from autorule_lib.verify.backends import TransformersBackend

    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="verifier-bench-"))
    if args.model == "tiny":
        torch.set_num_threads(args.threads or torch.get_num_threads())
        model, tok = load_local_judge(str(ensure_tiny_verifier(profile, models_dir)), profile)
        return TransformersBackend(model, tok), profile.verifier.max_new_tokens
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--model llama8b-random needs a CUDA GPU (or --device cpu with --quick-shape)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ensure_tiny_models(profile, models_dir)["tokenizer"]))
    # Llama-3-8B's shape; --quick-shape keeps its grouped-query ratio (4 query heads per kv head) at a width,
    # depth and vocabulary a CPU runs in seconds, to rehearse this code path (benchmarks/gpu_check.py).
    shape = (dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=len(tok)) if args.quick_shape else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256))
    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    # bf16, built directly in it (no 32 GB fp32 copy first); a CPU rehearsal keeps fp32, which a CPU runs faster
    torch.set_default_dtype(torch.bfloat16 if args.device == "cuda" else torch.float32)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    answer_len = len(tok(YES + "<|eot_id|>", add_special_tokens=False)["input_ids"])
    return TransformersBackend(model, tok), answer_len


def token_counts(tokenizer, convs) -> str:
    """Tokens the model encodes per run: every prompt whole, vs with prefix reuse (the judge
    instructions once, each conversation once, every rule's suffix).

    Their ratio bounds what prefix reuse can save in encoded tokens: the rule, the chat template's end
    and the forced answer start are encoded once per rule in any case.
    """
    from autorule_lib.verify.prompt import prompt_token_ids
    from autorule_lib.verify.backends import _common_prefix_len

    tpl = load_template("conversation_first")
    prompts = [prompt_token_ids(tokenizer, tpl, [(conv, r) for r in RULES]) for conv in convs]
    head = _common_prefix_len([ids[0] for ids in prompts])
    whole, reused = 0, head
    for ids in prompts:
        shared = _common_prefix_len(ids)
        whole += sum(map(len, ids))
        reused += shared - head + sum(len(x) - shared for x in ids)
    return (f"{whole} whole, {reused} with prefix reuse (mean prompt {whole / len(convs) / len(RULES):.0f}, "
            f"shared head {head}); token bound on prefix_reuse_speedup {whole / reused:.2f}")


def timed(verifiers: dict, convs, rules, repeats: int) -> dict:
    """Median seconds (and the verdicts) per verifier, timed round-robin so that a change in the machine's
    load during the run hits every setting alike."""
    import torch

    for v in verifiers.values():
        v.verify(convs[:2], rules)  # warm-up: kernels, allocator, lazy imports
    times = {key: [] for key in verifiers}
    out = {}
    for _ in range(repeats):
        for key, v in verifiers.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out[key] = v.verify(convs, rules)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    return {key: (statistics.median(t), out[key]) for key, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "llama8b-random"], default="tiny")
    ap.add_argument("--profile", default="smoke", help="profile whose data (and tiny models) are used")
    ap.add_argument("--models-dir", default=None, help="where tiny models are built/reused (default: a temp dir)")
    ap.add_argument("--conversations", type=int, default=8, help="responses judged (each under all 25 rules)")
    ap.add_argument("--max-conversation-tokens", type=int, default=500)
    ap.add_argument("--conversation-tokens", type=int, default=0,
                    help="lengthen every response until its conversation has at least this many tokens (0: as is)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device of --model llama8b-random")
    ap.add_argument("--quick-shape", action="store_true",
                    help="--model llama8b-random at a few narrow layers (a CPU rehearsal of this path)")
    ap.add_argument("--batch-sizes", default="8,16,25,50",
                    help="prompts per forward/generation batch; every mode is timed at each and keeps its best")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import dataclasses

    profile = load_profile(args.profile)
    backend, max_new_tokens = load_judge(args, profile)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = dataclasses.replace(profile.verifier, max_new_tokens=max_new_tokens, min_answer_mass=0.0,
                              use_cache=False, truncate_prompt_tokens=None)
    convs = conversations(profile, backend.tok, args.conversations, args.max_conversation_tokens,
                          args.conversation_tokens)
    checks = len(convs) * len(RULES)
    print(f"machine: {machine()}")
    print(f"judge: {args.model}{' (quick shape)' if args.quick_shape else ''}; {len(convs)} responses x K={len(RULES)} rules = {checks} checks per run; "
          f"parity max_new_tokens {max_new_tokens}; median of {args.repeats} runs; best of batch sizes {batch_sizes}")
    print(f"judge-prompt tokens (conversation_first): {token_counts(backend.tok, convs)}")

    def make(mode, layout, batch, reuse=True):
        v = RuleVerifier(backend, load_template(layout, cfg.concise_clause),
                         dataclasses.replace(cfg, batch_size=batch), "bench", mode)
        v.reuse_prefix = reuse
        return v

    runs = {
        "parity rule_first": ("parity", "rule_first", True),
        "parity conversation_first": ("parity", "conversation_first", True),
        "fast conversation_first, re-encode": ("fast", "conversation_first", False),
        "fast conversation_first, prefix reuse": ("fast", "conversation_first", True),
    }
    results = timed({(name, b): make(mode, layout, b, reuse) for name, (mode, layout, reuse) in runs.items()
                     for b in batch_sizes},
                    convs, RULES, args.repeats)
    seconds, verdicts = {}, {}
    for name in runs:
        by_batch = {b: results[(name, b)] for b in batch_sizes}
        best = min(by_batch, key=lambda b: by_batch[b][0])
        seconds[name], verdicts[name] = by_batch[best]
        sweep = ", ".join(f"{b}: {t:.3f}" for b, (t, _) in by_batch.items())
        print(f"  {name:40s} {seconds[name]:8.3f} s  {checks / seconds[name]:8.1f} checks/s  (batch {best}; {sweep})")
    flat = lambda name: [x.value for row in verdicts[name] for x in row]  # noqa: E731
    pairs = list(zip(flat("parity conversation_first"), flat("fast conversation_first, prefix reuse")))
    same = sum(a == b for a, b in pairs if a is not None and b is not None)
    unscored = {name: sum(x is None for x in flat(name)) for name in runs}
    print(f"verdict agreement, parity vs fast (conversation_first): {same}/{checks} identical scored verdicts; "
          f"unscored per setting: {unscored}")
    fast_vs_parity = seconds["parity conversation_first"] / seconds["fast conversation_first, prefix reuse"]
    paper_vs_fast = seconds["parity rule_first"] / seconds["fast conversation_first, prefix reuse"]
    reuse = seconds["fast conversation_first, re-encode"] / seconds["fast conversation_first, prefix reuse"]
    print(f"paper setup (parity, rule_first) vs fast with prefix reuse: {paper_vs_fast:.2f}x")
    print(f"fast_vs_parity_speedup={fast_vs_parity:.2f} prefix_reuse_speedup={reuse:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
