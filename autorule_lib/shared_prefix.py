"""Shared-prefix attention: the K rule suffixes of one response attend to its prefix, kept once.

The fast verifier encodes each response's shared prompt prefix (instructions + conversation) once and
then every rule's short suffix on top of it. Attending through a KV cache means copying the prefix's
keys and values once per rule and padding every suffix to the longest. Here the suffixes are packed
into one row without padding; the prefix keys/values stay one tensor per response, and all query
tokens of its suffixes attend to them in one fused attention call (the "inter-sequence batching" of
Hydragen, Juravsky et al. 2024). Each suffix also attends causally to itself; the two partial softmaxes
are merged exactly through their log-sum-exps, as flash-decoding merges its splits.

It plugs into transformers through ``AttentionInterface``: ``enable(model)`` registers a dispatcher
that runs this attention when a forward call carries ``shared_prefix=SharedPrefix(...)`` and the
model's own attention otherwise, so generation and training on the same model are unchanged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

NAME = "autorule_shared_prefix"
_CPU_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class SharedPrefix:
    """Cached prefixes and the layout of the packed suffix row that attends to them."""

    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [prefix][layer]: keys, values [1, kv_heads, n, d]
    spans: list[tuple[int, int, int]]  # (prefix index, first token, end token) in the packed row
    gather: torch.Tensor  # [suffixes, longest]: packed-token index of each suffix's i-th token (pads repeat one)
    scatter: torch.Tensor  # [packed tokens]: where each packed token sits in gather.flatten()
    self_mask: torch.Tensor  # [suffixes, 1, longest, longest] additive: causal within each suffix

    @classmethod
    def build(cls, caches, owners: list[int], suffix_lengths: list[int], dtype: torch.dtype, device) -> "SharedPrefix":
        """``caches[p]``: prefix p's KV cache (after RoPE); ``owners[r]``: the prefix suffix r continues.
        Suffixes of one prefix must be adjacent."""
        prefixes = [[(k, v) for k, v, *_ in cache] for cache in caches]
        starts = [0]
        for n in suffix_lengths:
            starts.append(starts[-1] + n)
        spans: list[tuple[int, int, int]] = []
        for r, p in enumerate(owners):
            if spans and spans[-1][0] == p:
                spans[-1] = (p, spans[-1][1], starts[r + 1])
            else:
                spans.append((p, starts[r], starts[r + 1]))
        if len({p for p, _, _ in spans}) != len(spans):
            raise ValueError("suffixes of one prefix must be adjacent in the packed row")
        longest = max(suffix_lengths)
        i = torch.arange(longest)
        lengths = torch.tensor(suffix_lengths)
        real = i[None, :] < lengths[:, None]
        gather = torch.where(real, torch.tensor(starts[:-1])[:, None] + i[None, :], torch.tensor(starts[:-1])[:, None])
        allowed = (i[None, None, :] <= i[None, :, None]) & real[:, None, :]
        self_mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None]
        return cls(prefixes, spans, gather.to(device),
                   real.flatten().nonzero().squeeze(1).to(device), self_mask.to(device))


def _own_attention(module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")  # the model's eager


def _dispatcher(base: str):
    def attention(module, query, key, value, attention_mask, *args, shared_prefix: SharedPrefix | None = None,
                  **kwargs):
        if shared_prefix is None:
            return _own_attention(module, base)(module, query, key, value, attention_mask, *args, **kwargs)
        out = attend(query[0], key[0], value[0], shared_prefix, module.layer_idx, kwargs.get("scaling", module.scaling))
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


def attention_with_lse(q, k, v, mask, scale: float, fused: bool = True):
    """Softmax attention and its log-sum-exp per query. q [B, H, L, d], k/v [B, H, S, d], additive mask or None."""
    if fused and _CPU_FUSED is not None and q.device.type == "cpu":
        return _CPU_FUSED(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def attend(query, key, value, sp: SharedPrefix, layer: int, scaling: float, fused: bool = True) -> torch.Tensor:
    """Exact attention of every packed suffix token over [its prefix ; its suffix's causal past].

    query [heads, T, d]; key/value [kv_heads, T, d] for the T packed suffix tokens. Returns [heads, T, d].
    """
    heads, tokens, dim = query.shape
    kv_heads = key.shape[0]
    rep = heads // kv_heads
    rows, longest = sp.gather.shape

    def padded(t):  # [h, T, d] -> [rows, h, longest, d]
        return t[:, sp.gather.flatten()].reshape(t.shape[0], rows, longest, dim).transpose(0, 1)

    k_self, v_self = padded(key), padded(value)
    if rep > 1:  # suffixes are short: expanding their own keys is cheap (the prefix's are never expanded)
        k_self, v_self = k_self.repeat_interleave(rep, dim=1), v_self.repeat_interleave(rep, dim=1)
    o_self, lse_self = attention_with_lse(padded(query), k_self, v_self, sp.self_mask, scaling, fused)
    o_self = o_self.transpose(0, 1).reshape(heads, rows * longest, dim)[:, sp.scatter]
    lse_self = lse_self.transpose(0, 1).reshape(heads, rows * longest)[:, sp.scatter]

    o_pre = torch.empty_like(query)
    lse_pre = torch.empty(heads, tokens, dtype=torch.float32, device=query.device)
    for p, lo, hi in sp.spans:
        kp, vp = sp.prefixes[p][layer]  # one per response, never copied per rule
        # Query heads sharing a kv head stack along the query axis: [1, kv_heads, rep * tokens, d].
        q = query[:, lo:hi].reshape(kv_heads, rep * (hi - lo), dim)[None]
        o, lse = attention_with_lse(q, kp, vp, None, scaling, fused)
        o_pre[:, lo:hi] = o[0].reshape(heads, hi - lo, dim)
        lse_pre[:, lo:hi] = lse[0].reshape(heads, hi - lo)

    m = torch.maximum(lse_pre, lse_self)
    w_pre, w_self = torch.exp(lse_pre - m)[..., None], torch.exp(lse_self - m)[..., None]
    return ((o_pre.float() * w_pre + o_self.float() * w_self) / (w_pre + w_self)).to(query.dtype)
