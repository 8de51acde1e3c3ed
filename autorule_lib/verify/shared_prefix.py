"""Shared-prefix attention: a call's rule checks in packed rows, every shared prefix encoded once.

A judge prompt is a head shared by every check (the instructions), a conversation part shared by the
K rules of one response, and a short suffix per rule. The head is encoded once per call, in its own
forward pass (``encode_head``). Each response's conversation part and then its K suffixes are laid end
to end in one row, without padding, several responses per row:
``[conversation 1, rule 1, …, rule K, conversation 2, rule 1, …]``. In every layer a conversation part
attends to the head and causally to itself; a suffix token attends to the head, to its conversation
part and causally to its own suffix. Keys and values of the shared parts are used in place, never
copied per rule, and all suffix tokens of a response query a shared part in one fused call (the
"inter-sequence batching" of Hydragen, Juravsky et al. 2024). The partial softmaxes are merged exactly
through their log-sum-exps, as flash-decoding merges its splits; no [T, T] mask is ever built.

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
    """Where the conversation parts and suffixes sit in the packed row, and the head they continue."""

    head: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the head's keys, values [kv_heads, n, d]; may be empty
    spans: list[tuple[int, int, int]]  # per response: conversation start, its end = first suffix token, end of suffixes
    part_masks: list[torch.Tensor]  # per response [part, head + part] bool: the whole head, then causal
    positions: torch.Tensor  # [T] position ids, continuing the head's
    suffix_tokens: torch.Tensor  # [Ts] row index of every suffix token, in row order
    gather: torch.Tensor  # [suffixes * longest]: row index of each suffix's i-th token (pads repeat its first)
    scatter: torch.Tensor  # [Ts] where each suffix token sits in ``gather``
    longest: int
    self_mask: torch.Tensor  # [suffixes, 1, longest, longest] additive: causal within each suffix
    readout: torch.Tensor  # row index of the last ``keep`` tokens of each suffix

    @classmethod
    def build(cls, head, head_len: int, parts: list[list[int]], suffixes: list[list[list[int]]], keep: int, dtype,
              device) -> tuple["PackedChecks", torch.Tensor]:
        """(layout, token ids [1, T]) for each conversation part ``parts[i]`` followed by its ``suffixes[i]``."""
        if len(parts) != len(suffixes) or not all(suffixes):
            raise ValueError("every conversation part needs at least one suffix")
        if any(len(s) < keep for rules in suffixes for s in rules):
            raise ValueError(f"every suffix must hold its {keep} read-out tokens")
        tokens, positions, spans, starts, lengths = [], [], [], [], []
        for part, rules in zip(parts, suffixes):
            a = len(tokens)
            tokens += part
            end = head_len + len(part)
            positions += range(head_len, end)
            for s in rules:
                starts.append(len(tokens))
                lengths.append(len(s))
                tokens += s
                positions += range(end, end + len(s))
            spans.append((a, a + len(part), len(tokens)))
        longest = max(lengths)
        i = torch.arange(longest)
        start, length = torch.tensor(starts)[:, None], torch.tensor(lengths)[:, None]
        real = i[None, :] < length
        allowed = (i[None, None, :] <= i[None, :, None]) & real[:, None, :]
        self_mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None]
        gather = torch.where(real, start + i[None, :], start)
        part_masks = [torch.ones(b - a, head_len + b - a, dtype=torch.bool, device=device).tril(head_len)
                      for a, b, _ in spans]
        layout = cls(head, spans, part_masks, torch.tensor(positions, device=device), gather[real].to(device),
                     gather.flatten().to(device), real.flatten().nonzero().squeeze(1).to(device), longest,
                     self_mask.to(device), (start + length - keep + torch.arange(keep)[None, :]).flatten().to(device))
        return layout, torch.tensor([tokens], device=device)


def encode_head(model, head: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The head's keys and values per layer (the model's own attention: a plain causal pass)."""
    if not head:
        return []
    cache = model(input_ids=torch.tensor([head], device=model.device), use_cache=True,
                  logits_to_keep=1).past_key_values
    return [(k[0], v[0]) for k, v, *_ in cache]


def check_logits(model, head: list[int], parts: list[list[int]], suffixes: list[list[list[int]]], keep: int,
                 head_kv=None) -> torch.Tensor:
    """Logits [checks, keep, vocab] at the last ``keep`` tokens of every suffix, each read as continuing
    ``head + parts[i]``; one forward pass for all (the model must be ``enable``d). ``head_kv`` is
    ``encode_head(model, head)``, computed once when several calls share the head."""
    head_kv = encode_head(model, head) if head_kv is None else head_kv
    layout, tokens = PackedChecks.build(head_kv, len(head), parts, suffixes, keep, model.dtype, model.device)
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
        out = attend(query[0], key[0], value[0], packed_checks, module.layer_idx,
                     kwargs.get("scaling", module.scaling))
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


def attention_with_lse(q, k, v, scale: float, mask=None):
    """Softmax attention and its log-sum-exp per query. q [B, H, L, d], k/v [B, H, S, d], additive mask or None."""
    if _CPU_FUSED is not None and q.device.type == "cpu":
        return _CPU_FUSED(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def _shared_part(q, k, v, scale: float):
    """(output, log-sum-exp) of q [heads, n, d] over k/v [kv_heads, s, d], every query seeing every key.

    Query heads sharing a kv head stack along the query axis: one call, the keys used in place."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    o, lse = attention_with_lse(q.reshape(kv_heads, heads // kv_heads * n, dim)[None], k[None], v[None], scale)
    return o[0].reshape(heads, n, dim), lse[0].reshape(heads, n)


def attend(query, key, value, lay: PackedChecks, layer: int, scaling: float) -> torch.Tensor:
    """Exact attention over the packed row. query [heads, T, d]; key/value [kv_heads, T, d]. Returns [heads, T, d]."""
    heads, _, dim = query.shape
    rep = heads // key.shape[0]
    head_k, head_v = lay.head[layer] if lay.head else (key[:, :0], value[:, :0])
    n_head = head_k.shape[1]
    out = torch.empty_like(query)
    o_pre, lse_pre = [], []
    for (a, b, end), part_mask in zip(lay.spans, lay.part_masks):
        # The keys a response's tokens share: the head (one copy per response, not per rule) and its conversation.
        kc = torch.cat([head_k, key[:, a:b]], dim=1) if n_head else key[:, a:b]
        vc = torch.cat([head_v, value[:, a:b]], dim=1) if n_head else value[:, a:b]
        if b > a:  # the conversation part: the whole head, and causally itself
            out[:, a:b] = F.scaled_dot_product_attention(query[None, :, a:b], kc[None], vc[None], attn_mask=part_mask,
                                                         scale=scaling, enable_gqa=rep > 1)[0]
        o, lse = _shared_part(query[:, b:end], kc, vc, scaling)
        o_pre.append(o)
        lse_pre.append(lse)
    o_pre, lse_pre = torch.cat(o_pre, dim=1), torch.cat(lse_pre, dim=1)

    rows = lay.self_mask.shape[0]

    def padded(t):  # [h, T, d] -> [suffixes, h, longest, d]
        return t[:, lay.gather].reshape(t.shape[0], rows, lay.longest, dim).transpose(0, 1)

    k_self, v_self = padded(key), padded(value)
    if rep > 1:  # suffixes are short: expanding their own keys is cheap
        k_self, v_self = k_self.repeat_interleave(rep, dim=1), v_self.repeat_interleave(rep, dim=1)
    o_self, lse_self = attention_with_lse(padded(query), k_self, v_self, scaling, mask=lay.self_mask)
    o_self = o_self.transpose(0, 1).reshape(heads, -1, dim)[:, lay.scatter]
    lse_self = lse_self.transpose(0, 1).reshape(heads, -1)[:, lay.scatter]

    # Exact softmax over both key sets, from each one's output and log-sum-exp.
    m = torch.maximum(lse_pre, lse_self)
    w_pre, w_self = torch.exp(lse_pre - m)[..., None], torch.exp(lse_self - m)[..., None]
    out[:, lay.suffix_tokens] = ((o_pre.float() * w_pre + o_self.float() * w_self) / (w_pre + w_self)).to(query.dtype)
    return out
