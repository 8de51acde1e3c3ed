"""Tiny Llama-architecture models and a BPE tokenizer, built locally and deterministically.

The smoke profile uses them in every role the paper gives to Llama-3-8B, so the same code paths
(``from_pretrained``, chat templates, the no-BOS text format) run on CPU with no download.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable

from ..artifacts import files_stamp
from ..config import Profile, TinyModelConfig
from ..text_format import ASSISTANT, USER
from ..data.preparation import iter_texts

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3 ships reserved special tokens; the reward model pads with one so that EOS (= the policy's pad)
# is not mistaken for padding and the reward is read at the real last token.
RESERVED = "<|reserved_special_token_0|>"
BUILD_VERSION = 2  # bump when the tokenizer or model recipe changes, so cached builds are rebuilt
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Llama-3-Instruct's layout, so a tiny verifier takes the same chat-template path as the real one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], cfg: TinyModelConfig, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` and save it as a transformers tokenizer.

    ``encode`` prepends BOS like Llama-3's tokenizer, so the length filter counts what it would.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = sorted(set(texts))  # order-independent input -> same merges every time
    random.Random(cfg.seed).shuffle(corpus)
    corpus += [f"{USER}x{ASSISTANT}y {EOS}"] * 8  # the format markers get merges of their own
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, HEADER_START, HEADER_END, EOT, RESERVED]
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[HEADER_START, HEADER_END, EOT, RESERVED])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(tokenizer, cfg: TinyModelConfig, out_dir: str | Path, seed_offset: int = 0):
    """A randomly initialised Llama with the tokenizer's vocabulary, saved with ``save_pretrained``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed + seed_offset)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def tiny_corpus(profile: Profile) -> list[str]:
    """Every text of the profile's UltraFeedback and MT-Bench sources (the tokenizer's training data)."""
    return list(iter_texts(profile.data.ultrafeedback_source)) + list(iter_texts(profile.data.mt_bench_source))


_CORPUS_DIGESTS: dict[tuple, str] = {}


def corpus_digest(profile: Profile) -> tuple[str, list[str] | None]:
    """(hash of the tiny corpus, the corpus if it had to be read). Local sources unchanged since an
    earlier call in this process are not read again: every model lookup checks the build stamp."""
    sources = (profile.data.ultrafeedback_source, profile.data.mt_bench_source)
    key = tuple(files_stamp(s) if Path(s).exists() else None for s in sources)  # None: a Hub id
    if None not in key and key in _CORPUS_DIGESTS:
        return _CORPUS_DIGESTS[key], None
    corpus = tiny_corpus(profile)
    digest = hashlib.sha256("\n".join(sorted(corpus)).encode()).hexdigest()
    if None not in key:
        _CORPUS_DIGESTS[key] = digest
    return digest, corpus


def ensure_tiny_models(profile: Profile, models_dir: str | Path) -> dict[str, Path]:
    """Build (once) the tiny tokenizer, policy and verifier for ``profile`` under ``models_dir``.

    A stamp holding the shape and corpus hash makes a changed profile rebuild instead of reusing.
    """
    models_dir = Path(models_dir)
    paths = {"tokenizer": models_dir / "tiny-tokenizer", "policy": models_dir / "tiny-policy",
             "verifier": models_dir / "tiny-verifier"}
    digest, corpus = corpus_digest(profile)
    stamp = json.dumps({"version": BUILD_VERSION, "tiny": profile.models.tiny.__dict__, "corpus": digest},
                       sort_keys=True)
    stamp_file = models_dir / "tiny-models.json"
    if stamp_file.exists() and stamp_file.read_text() == stamp and all(p.exists() for p in paths.values()):
        return paths
    models_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(corpus or tiny_corpus(profile), profile.models.tiny, paths["tokenizer"])
    build_tiny_llama(tokenizer, profile.models.tiny, paths["policy"], seed_offset=0)
    build_tiny_llama(tokenizer, profile.models.tiny, paths["verifier"], seed_offset=1)
    stamp_file.write_text(stamp)
    return paths


