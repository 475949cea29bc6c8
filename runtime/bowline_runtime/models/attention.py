"""Paged attention plugged into transformers' own model code through its AttentionInterface.

transformers computes projections, rotary embeddings and MLPs; this function receives each layer's
new queries/keys/values for a *packed* batch (all sequences' new tokens side by side in one row),
writes the keys/values into the block-based KV cache and attends over each sequence's cached context.
Decodes (one new token each) are attended in one batched product; prefill chunks one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "bowline"


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's prefill chunk: queries [q_start, q_end) of the packed row, context length after it."""

    q_start: int
    q_end: int
    context_len: int
    context_slots: torch.Tensor | None  # cache slots of positions [0, context_len); None: no cached prefix


@dataclass(slots=True)
class DecodeGroup:
    """Decodes [start, end) of the packed row, attended together: contexts padded to the longest one."""

    start: int
    end: int
    blocks: torch.Tensor  # [n, max_blocks] block tables, padded with block 0
    mask: torch.Tensor  # [1, n, 1, max_blocks * block_size] additive mask (0 or -inf)


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to. Built once per step."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    decode_groups: list[DecodeGroup]  # single-token decodes, at the front of the packed row
    block_size: int
    prefills: list[PrefillSpan] = field(default_factory=list)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [Hkv, slots, D]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]."""
    if attn_meta is None:
        raise RuntimeError("paged attention needs `attn_meta`; run the model through bowline's ModelRunner")
    k_cache, v_cache = attn_meta.kv_caches[module.layer_idx]  # [Hkv, slots, D]
    q = query[0]  # [H, T, D]
    k = key[0]  # [Hkv, T, D]
    v = value[0]
    k_cache.index_copy_(1, attn_meta.slot_mapping, k)
    v_cache.index_copy_(1, attn_meta.slot_mapping, v)

    num_heads, num_tokens, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    for group in attn_meta.decode_groups:
        out[group.start : group.end] = _decode_attention(
            q[:, group.start : group.end], k_cache, v_cache, group, attn_meta.block_size, scaling
        )
    for span in attn_meta.prefills:
        qs = q[:, span.q_start : span.q_end].unsqueeze(0)  # [1, H, q, D]
        if span.context_slots is None:
            ks = k[:, span.q_start : span.q_end].unsqueeze(0)
            vs = v[:, span.q_start : span.q_end].unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            ks = k_cache.index_select(1, span.context_slots).unsqueeze(0)  # [1, Hkv, ctx, D]
            vs = v_cache.index_select(1, span.context_slots).unsqueeze(0)
            q_len = span.q_end - span.q_start
            offset = span.context_len - q_len
            rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
            allowed = torch.arange(span.context_len, device=q.device).unsqueeze(0) <= rows  # causal with the prefix
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scaling, enable_gqa=True)
        out[span.q_start : span.q_end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _decode_attention(
    q: torch.Tensor, k_cache, v_cache, group: DecodeGroup, block_size: int, scaling
) -> torch.Tensor:
    """All decodes at once: grouped-query scores against each sequence's gathered context.

    The cache is head-major ([Hkv, slots, D]), so the gathered context is [Hkv, nd, L, D] and both
    products run as batched matmuls over (Hkv, nd) with no copy of the context beyond the gather.
    """
    num_heads, nd, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    per_kv = num_heads // num_kv_heads  # query heads sharing each key/value head
    # Gather whole blocks (rows of block_size * D values), not single slots: fewer, longer copies.
    blocks = group.blocks.reshape(-1)
    max_len = group.blocks.shape[1] * block_size
    by_block = (num_kv_heads, -1, block_size * head_dim)
    keys = k_cache.view(by_block).index_select(1, blocks).view(num_kv_heads, nd, max_len, head_dim)
    values = v_cache.view(by_block).index_select(1, blocks).view(num_kv_heads, nd, max_len, head_dim)
    qg = q.view(num_kv_heads, per_kv, nd, head_dim).transpose(1, 2)  # [Hkv, nd, G, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [Hkv, nd, G, L]
    scores.mul_(scaling if scaling is not None else head_dim**-0.5)
    scores.add_(group.mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)  # [Hkv, nd, G, D]
    return out.permute(1, 0, 2, 3).reshape(nd, num_heads, head_dim)


def _no_mask(*args, **kwargs) -> None:
    """Masks are built per step by the runner, not by transformers."""
    return None


def register() -> None:
    """Make `attn_implementation="bowline"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
