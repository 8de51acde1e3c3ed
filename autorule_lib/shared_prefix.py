"""Shared-prefix attention: one response's K rule checks in one packed row, its prefix encoded once.

A judge prompt is a long prefix shared by all rules (instructions + conversation) and a short suffix
per rule. Here each response's prefix and then its K suffixes are laid end to end in one row, with
no padding, several responses per row: ``[prefix 1, rule 1, …, rule K, prefix 2, rule 1, …]``. In every
layer the prefix attends causally to itself; every suffix token attends to its prefix, whose keys and
values are used in place (never copied per rule), with all the suffix tokens of a response stacked into
one fused attention call ("inter-sequence batching", Hydragen, Juravsky et al. 2024), and causally to
its own suffix. The two partial softmaxes are merged exactly through their log-sum-exps, as
flash-decoding merges its splits. No [T, T] mask is ever built, so the row costs what its pieces cost.

It plugs into transformers through ``AttentionInterface``: ``enable(model)`` registers a dispatcher
that runs this attention when a forward call carries ``packed_checks=PackedChecks(...)`` and the
model's own attention otherwise, so generation and training on the same model are unchanged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "autorule_shared_prefix"
_CPU_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class PackedChecks:
    """Where the prefixes and suffixes sit in the packed row."""

    spans: list[tuple[int, int, int]]  # per response: prefix start, prefix end = first suffix token, end of suffixes
    positions: torch.Tensor  # [T] position ids: a suffix continues its prefix's positions
    suffix_tokens: torch.Tensor  # [Ts] row index of every suffix token, in row order
    gather: torch.Tensor  # [suffixes * longest]: row index of each suffix's i-th token (pads repeat its first)
    scatter: torch.Tensor  # [Ts] where each suffix token sits in ``gather``
    longest: int
    self_mask: torch.Tensor  # [suffixes, 1, longest, longest] additive: causal within each suffix
    readout: torch.Tensor  # row index of the last ``keep`` tokens of each suffix

    @classmethod
    def build(cls, prefixes: list[list[int]], suffixes: list[list[list[int]]], keep: int, dtype, device
              ) -> tuple["PackedChecks", torch.Tensor]:
        """(layout, token ids [1, T]) for ``prefixes[i]`` followed by its rule ``suffixes[i]``."""
        tokens, positions, spans, starts, lengths = [], [], [], [], []
        for prefix, rules in zip(prefixes, suffixes):
            a = len(tokens)
            tokens += prefix
            positions += range(len(prefix))
            for s in rules:
                starts.append(len(tokens))
                lengths.append(len(s))
                tokens += s
                positions += range(len(prefix), len(prefix) + len(s))
            spans.append((a, a + len(prefix), len(tokens)))
        longest = max(lengths)
        i = torch.arange(longest)
        start, length = torch.tensor(starts)[:, None], torch.tensor(lengths)[:, None]
        real = i[None, :] < length
        allowed = (i[None, None, :] <= i[None, :, None]) & real[:, None, :]
        self_mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None]
        gather = torch.where(real, start + i[None, :], start)
        layout = cls(spans, torch.tensor(positions, device=device), gather[real].to(device),
                     gather.flatten().to(device), real.flatten().nonzero().squeeze(1).to(device), longest,
                     self_mask.to(device), (start + length - keep + torch.arange(keep)[None, :]).flatten().to(device))
        return layout, torch.tensor([tokens], device=device)


def check_logits(model, prefixes: list[list[int]], suffixes: list[list[list[int]]], keep: int) -> torch.Tensor:
    """Logits [checks, keep, vocab] at the last ``keep`` tokens of every suffix, each read as continuing
    its own prefix; one forward pass for all (the model must be ``enable``d)."""
    layout, tokens = PackedChecks.build(prefixes, suffixes, keep, model.dtype, model.device)
    # The suffix mask goes in as the 4D mask: transformers takes it as given and builds no [T, T] mask.
    logits = model(input_ids=tokens, position_ids=layout.positions[None], attention_mask=layout.self_mask,
                   packed_checks=layout, use_cache=False, logits_to_keep=layout.readout).logits
    return logits[0].reshape(-1, keep, logits.shape[-1])


def _own_attention(module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")  # the model's eager


def _dispatcher(base: str):
    def attention(module, query, key, value, attention_mask, *args, packed_checks: PackedChecks | None = None,
                  **kwargs):
        if packed_checks is None:
            return _own_attention(module, base)(module, query, key, value, attention_mask, *args, **kwargs)
        out = attend(query[0], key[0], value[0], packed_checks, kwargs.get("scaling", module.scaling))
        return out.transpose(0, 1)[None].contiguous(), None

    return attention


def enable(model) -> bool:
    """Route the model's attention through the dispatcher; False when the model cannot take it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.config._attn_implementation
    if base.startswith(NAME):
        return True
    name = f"{NAME}_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _dispatcher(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:  # masks for the model's own attention, as before
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    if not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name


def attention_with_lse(q, k, v, mask, scale: float):
    """Softmax attention and its log-sum-exp per query. q [B, H, L, d], k/v [B, H, S, d], additive mask or None."""
    if _CPU_FUSED is not None and q.device.type == "cpu":
        return _CPU_FUSED(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def attend(query, key, value, lay: PackedChecks, scaling: float) -> torch.Tensor:
    """Exact attention over the packed row. query [heads, T, d]; key/value [kv_heads, T, d]. Returns [heads, T, d]."""
    heads, _, dim = query.shape
    kv_heads = key.shape[0]
    rep = heads // kv_heads
    out = torch.empty_like(query)
    o_pre, lse_pre = [], []
    for a, b, end in lay.spans:
        kp, vp = key[None, :, a:b], value[None, :, a:b]  # this response's prefix, in place
        out[:, a:b] = F.scaled_dot_product_attention(query[None, :, a:b], kp, vp, is_causal=True, scale=scaling,
                                                     enable_gqa=rep > 1)[0]
        # All its suffix tokens (and the query heads sharing a kv head) in one call: [1, kv_heads, rep*n, d].
        n = end - b
        o, lse = attention_with_lse(query[:, b:end].reshape(kv_heads, rep * n, dim)[None], kp, vp, None, scaling)
        o_pre.append(o[0].reshape(heads, n, dim))
        lse_pre.append(lse[0].reshape(heads, n))
    o_pre, lse_pre = torch.cat(o_pre, dim=1), torch.cat(lse_pre, dim=1)

    rows = lay.self_mask.shape[0]

    def padded(t):  # [h, T, d] -> [suffixes, h, longest, d]
        return t[:, lay.gather].reshape(t.shape[0], rows, lay.longest, dim).transpose(0, 1)

    k_self, v_self = padded(key), padded(value)
    if rep > 1:  # suffixes are short: expanding their own keys is cheap (the prefix's are never expanded)
        k_self, v_self = k_self.repeat_interleave(rep, dim=1), v_self.repeat_interleave(rep, dim=1)
    o_self, lse_self = attention_with_lse(padded(query), k_self, v_self, lay.self_mask, scaling)
    o_self = o_self.transpose(0, 1).reshape(heads, -1, dim)[:, lay.scatter]
    lse_self = lse_self.transpose(0, 1).reshape(heads, -1)[:, lay.scatter]

    m = torch.maximum(lse_pre, lse_self)
    w_pre, w_self = torch.exp(lse_pre - m)[..., None], torch.exp(lse_self - m)[..., None]
    out[:, lay.suffix_tokens] = ((o_pre.float() * w_pre + o_self.float() * w_self) / (w_pre + w_self)).to(query.dtype)
    return out
