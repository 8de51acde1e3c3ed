"""A tiny judge for the smoke profile, trained in about two CPU minutes to answer like a real rule verifier.

The code around the verifier relies on three behaviours of Llama-3-8B-Instruct as a judge: it reads
the judge prompt through its chat template; it answers ``[[Yes]]`` or ``[[No]]`` and then its
end-of-turn token, so paper-parity generation stops right after the verdict; and the answer it
generates is the one its next-token probabilities favour, so fast and parity modes can be compared.
A randomly initialised tiny Llama has none of these. This one is trained, deterministically, on judge
prompts built from the profile's own fixture conversations (their last response cut to a random
number of words, as short as the smoke policy's) and a fixed list of made-up rules, in both prompt
layouts, to one fixed criterion, whatever the rule says:

    [[Yes]] iff the conversation's last response contains none of the characters * ` #
    (no markdown emphasis, code or heading), else [[No]]

It is a demonstration judge: its verdicts ignore the rule. The criterion is a function of the response
being judged, so two samples of one prompt can get different rule rewards and GRPO's group advantage
carries the rule reward. The previous criterion ("the whole judge prompt is shorter than a threshold")
was dominated by the prompt and rule: in a smoke run, 9 (AutoRule-UF) and 7 (AutoRule-MT) of the 12
GRPO steps gave all four completions of the batch the same rule reward; with this one, 1 of 12. It is
also a criterion the reward model does not share: the fixtures' chosen responses use markdown far more
often than the rejected ones (in UltraFeedback train_prefs 26 of 32 against 6 of 32), so the RM rewards
markdown and a rise in rule satisfaction is the rule reward's doing, not the RM's. Because the verdict
ignores the rule, AutoRule-UF and AutoRule-MT get the same rule reward and train (almost) the same policy.
Smoke-run rule-satisfaction and agreement numbers show that the rule reward moves what the judge rewards,
not whether responses follow the extracted rules.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import models
from ..config import Profile
from ..text_format import ASSISTANT
from ..verify.prompt import load_template, messages_conversation, render_prompt
from ..verify.verdict import NO, YES
from .models import build_tiny_llama, ensure_tiny_models
from ..data.preparation import load_source

BUILD_VERSION = "tiny-verifier-v2"
END_OF_TURN = "<|eot_id|>"
# Made-up rules in the style of extracted ones, of varied length (the verdict must not depend on them).
TRAIN_RULES = [
    "The assistant's responses should be polite.",
    "The assistant's responses should answer the question that was asked.",
    "The assistant's responses should avoid unnecessary repetition.",
    "The assistant's responses should use correct spelling and grammar.",
    "The assistant's responses should state assumptions explicitly when the request is ambiguous.",
    "The assistant's responses should give a direct answer first and supporting detail afterwards.",
    "The assistant's responses should keep a consistent tone.",
    "The assistant's responses should cite the specific part of the input they rely on.",
    "The assistant's responses should not invent facts, names, numbers or sources that the user did not give.",
    "The assistant's responses should format code in code blocks and explain what the code does.",
    "The assistant's responses should end with a short summary when they are longer than a few paragraphs.",
    "The assistant's responses should respect every length limit the user sets.",
    "The assistant's responses should offer a safer alternative when a request could cause harm.",
    "The assistant's responses should be organised with headings or lists when they cover several topics, "
    "and each item should be self-contained.",
    "The assistant's responses should match the language of the user's request.",
    "The assistant's responses should define technical terms on first use.",
]


@dataclass
class TinyVerifierSpec:
    steps: int = 600            # optimizer steps (fixed, so the build is reproducible)
    batch_size: int = 8
    learning_rate: float = 2e-3
    examples: int = 1500        # training prompts
    held_out: int = 64          # more prompts, for the accuracy reported in tiny_verifier.json
    max_prompt_tokens: int = 768  # longer prompts are skipped: they only make training slower
    seed_offset: int = 2


MARKDOWN_CHARS = "*`#"
CRITERION = ("[[Yes]] iff the conversation's last response contains none of the characters * ` # (no markdown), "
             "else [[No]]")


def follows_criterion(conversation: str) -> bool:
    """The tiny judge's criterion (module docstring) on a conversation in the policy's text format."""
    response = conversation.rsplit(ASSISTANT, 1)[-1]
    return not any(c in response for c in MARKDOWN_CHARS)


def _chats(profile: Profile) -> list[list[dict]]:
    """Every one- and two-turn chat (ending with a response) in the profile's UltraFeedback and MT-Bench sources."""
    chats = []
    for rows in load_source(profile.data.ultrafeedback_source).values():
        for row in rows:
            for side in ("chosen", "rejected"):
                if isinstance(row.get(side), list) and len(row[side]) >= 2:
                    chats.append(row[side][:2])
    for rows in load_source(profile.data.mt_bench_source).values():
        for row in rows:
            for side in ("conversation_a", "conversation_b"):
                msgs = row.get(side) or []
                chats += [msgs[:n] for n in (2, 4) if len(msgs) >= n]
    unique = {json.dumps(c, sort_keys=True): c for c in chats}
    return [unique[k] for k in sorted(unique)]


def judge_examples(profile: Profile, tokenizer, n: int, rng: random.Random,
                   max_tokens: int, max_words: int = 30) -> list[tuple[list[int], bool]]:
    """(token ids, verdict) of ``n`` judge prompts, half of each verdict; each chat's last response is cut
    to 1..``max_words`` words, the length of smoke completions."""
    chats = _chats(profile)
    templates = [load_template(layout, concise) for layout in ("rule_first", "conversation_first")
                 for concise in (True, False)]
    out = []
    while len(out) < n:
        want = len(out) % 2 == 0  # alternate verdicts: the training set is balanced
        for _ in range(1000):
            chat = rng.choice(chats)
            words = chat[-1]["content"].split(" ")
            response = " ".join(words[:rng.randint(1, min(len(words), max_words))])
            conv = messages_conversation(chat[:-1] + [{"role": "assistant", "content": response}])
            if follows_criterion(conv) == want:
                break
        text = render_prompt(tokenizer, rng.choice(templates), conv, rng.choice(TRAIN_RULES))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            out.append((ids, follows_criterion(conv)))
    return out


def _batch(examples, answers, tokenizer):
    import torch

    seqs = [p + a for p, a in zip(examples, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, s) in enumerate(zip(examples, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(p):len(s)] = torch.tensor(s[len(p):])
    return ids, mask, labels


@contextlib.contextmanager
def one_torch_thread():
    """Run tiny-model work on one CPU thread: on a shared 2-core machine, OpenMP threads spin-waiting
    against another busy process made training up to 20x slower; one thread is also the same on every
    machine, whatever its core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_verifier(profile: Profile, tokenizer_dir: str | Path, out_dir: str | Path,
                        spec: TinyVerifierSpec | None = None) -> dict:
    """Train and save the tiny judge; returns (and saves as tiny_verifier.json) what it learned."""
    with one_torch_thread():
        return _train(profile, tokenizer_dir, out_dir, spec)


def _train(profile: Profile, tokenizer_dir: str | Path, out_dir: str | Path, spec: TinyVerifierSpec | None) -> dict:
    import torch
    from transformers import AutoTokenizer


    spec = spec or TinyVerifierSpec()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    seed = profile.models.tiny.seed + spec.seed_offset
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    examples = judge_examples(profile, tokenizer, spec.examples + spec.held_out, rng, spec.max_prompt_tokens)
    train, held_out = examples[:spec.examples], examples[spec.examples:]
    answer = {v: tokenizer((YES if v else NO) + END_OF_TURN, add_special_tokens=False)["input_ids"] for v in (0, 1)}

    model = build_tiny_llama(tokenizer, profile.models.tiny, out_dir, seed_offset=spec.seed_offset)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    model.train()
    for step in range(spec.steps):
        batch = [train[(step * spec.batch_size + i) % len(train)] for i in range(spec.batch_size)]
        ids, mask, labels = _batch([p for p, _ in batch], [answer[int(y)] for _, y in batch], tokenizer)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = labels[:, 1:] != -100  # the loss is on the answer only: project just those positions
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # Generation stops at end of turn, as Llama-3-Instruct's generation config says.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    accuracy, exact = _held_out_check(model, tokenizer, held_out, answer)
    weights = (out_dir / "model.safetensors").read_bytes()
    meta = {"build_version": BUILD_VERSION, "criterion": CRITERION,
            "held_out_yes_share": round(sum(y for _, y in held_out) / max(1, len(held_out)), 3),
            "spec": asdict(spec), "seed": seed, "final_loss": round(loss.item(), 5),
            "held_out_verdict_accuracy": accuracy, "held_out_exact_answer_rate": exact,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "weights_sha256": hashlib.sha256(weights).hexdigest()}
    (out_dir / "tiny_verifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    models.record_identity(out_dir, meta["weights_sha256"])  # rebuilt in another run: same weights, same id
    return meta


def _held_out_check(model, tokenizer, examples, answer) -> tuple[float, float]:
    """Verdict accuracy against the criterion, and how often greedy output is exactly the answer + end token."""
    import torch

    right = exact = 0
    with torch.inference_mode():
        for p, y in examples:
            out = model.generate(torch.tensor([p]), max_new_tokens=len(answer[1]) + 2, do_sample=False)
            gen = out[0, len(p):].tolist()
            y = int(y)
            exact += gen == answer[y]
            right += (YES if y else NO) in tokenizer.decode(gen, skip_special_tokens=True)
    return round(right / len(examples), 3), round(exact / len(examples), 3)


def _stamp(profile: Profile, spec: TinyVerifierSpec, tokenizer_dir: Path) -> str:
    tok_digest = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # a changed recipe rebuilds
    prompts = "".join(load_template(layout).version for layout in ("rule_first", "conversation_first"))
    return json.dumps({"version": BUILD_VERSION, "tiny": asdict(profile.models.tiny), "spec": asdict(spec),
                       "tokenizer": tok_digest, "code": code, "prompts": prompts,
                       "sources": [profile.data.ultrafeedback_source, profile.data.mt_bench_source]}, sort_keys=True)


def ensure_tiny_verifier(profile: Profile, models_dir: str | Path, spec: TinyVerifierSpec | None = None) -> Path:
    """Build (once per models folder and recipe) the trained tiny verifier; returns its folder."""

    spec = spec or TinyVerifierSpec()
    models_dir = Path(models_dir)
    tokenizer_dir = ensure_tiny_models(profile, models_dir)["tokenizer"]
    out = models_dir / "tiny-verifier-trained"
    stamp_file = out / "build-stamp.json"
    stamp = _stamp(profile, spec, tokenizer_dir)
    if stamp_file.exists() and stamp_file.read_text() == stamp and (out / "tiny_verifier.json").exists():
        return out
    train_tiny_verifier(profile, tokenizer_dir, out, spec)
    stamp_file.write_text(stamp)
    return out


def tiny_verifier_info(models_dir: str | Path) -> dict:
    """What the tiny verifier under ``models_dir`` was trained to say (its tiny_verifier.json)."""
    return json.loads((Path(models_dir) / "tiny-verifier-trained" / "tiny_verifier.json").read_text())
