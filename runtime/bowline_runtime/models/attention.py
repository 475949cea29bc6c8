"""Paged attention, called by the packed decoder (models.packed_decoder) for Llama-family models and
plugged into transformers' own model code through its AttentionInterface for every other architecture.

Either forward computes projections, rotary embeddings and MLPs; this function receives each layer's
new queries/keys/values for a *packed* batch (all sequences' new tokens side by side in one row),
writes the keys/values into the block-based KV cache and attends over each sequence's cached context.
Decodes (one new token each) are attended in one batched product, prefill chunks one sequence at a
time with torch's SDPA; a device with its own paged kernels (the CPU's, in bowline_runtime.kernels)
attends both straight from the cache instead.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Decodes [start, end) of the packed row, attended together: contexts padded to the longest one.

    Gathering each sequence's blocks out of the paged cache costs a read and a write of the whole
    context per layer per step, twice what the attention products themselves read. So a group keeps
    its gathered context in `staged` (per layer, [Hkv, n, capacity, D]) from one step to the next:
    while the same sequences keep decoding (`reuse`), each step only appends the new token's key
    and value; any change of membership, or outgrowing the capacity, gathers afresh.
    """

    start: int
    end: int
    blocks: torch.Tensor  # [n, max_blocks] block tables, padded with block 0
    lens: torch.Tensor  # [n] context lengths, including this step's token
    mask: torch.Tensor | None  # [1, n, 1, max(lens)] additive mask (0 or -inf); None with a decode kernel
    staged: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> staged (keys, values)
    reuse: bool
    capacity: int


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to. Built once per step."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    decode_groups: list[DecodeGroup]  # single-token decodes, at the front of the packed row
    block_size: int
    prefills: list[PrefillSpan] = field(default_factory=list)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [Hkv, slots, D]
    # (q [H, n, D], k_cache, v_cache, block tables, lens, scale, block_size, out [n, H, D]) -> None, or None
    decode_kernel: Callable[..., None] | None = None
    # (q [H, n, D], k_cache, v_cache, slots of positions [0, ctx), scale, out [n, H, D]) -> None, or None
    prefill_kernel: Callable[..., None] | None = None
    # (k [Hkv, T, D], v, k_cache, v_cache, slot_mapping) -> None, or None: torch's index_copy_
    cache_writer: Callable[..., None] | None = None


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
    out = attend(module.layer_idx, query[0], key[0], value[0], scaling, attn_meta)
    return out.unsqueeze(0), None


def attend(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None, attn_meta: AttentionMetadata
) -> torch.Tensor:
    """The step's new keys/values into layer's cache, then attention: q [H, T, D], k/v [Hkv, T, D] (views
    of any strides) -> [T, H, D]. What the packed decoder calls directly, without transformers' batch
    dimension to add and take off again (seven view operations per layer, each a few us of Python)."""
    k_cache, v_cache = attn_meta.kv_caches[layer]  # [Hkv, slots, D], of --kv-cache-dtype
    if attn_meta.cache_writer is not None:
        attn_meta.cache_writer(k, v, k_cache, v_cache, attn_meta.slot_mapping)
    else:
        k_cache.index_copy_(1, attn_meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(1, attn_meta.slot_mapping, v.to(v_cache.dtype))

    num_heads, num_tokens, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    scale = scaling if scaling is not None else head_dim**-0.5
    for group in attn_meta.decode_groups:
        if attn_meta.decode_kernel is not None:
            attn_meta.decode_kernel(
                q[:, group.start : group.end], k_cache, v_cache, group.blocks, group.lens, scale,
                attn_meta.block_size, out[group.start : group.end],
            )
            continue
        keys, values = _staged_context(layer, k, v, k_cache, v_cache, group, attn_meta.block_size)
        out[group.start : group.end] = _decode_attention(q[:, group.start : group.end], keys, values, group, scale)
    for span in attn_meta.prefills:
        if attn_meta.prefill_kernel is not None:  # reads this chunk's keys/values back from the cache
            slots = attn_meta.slot_mapping[span.q_start : span.q_end] if span.context_slots is None else span.context_slots
            attn_meta.prefill_kernel(
                q[:, span.q_start : span.q_end], k_cache, v_cache, slots, scale, out[span.q_start : span.q_end]
            )
            continue
        qs = q[:, span.q_start : span.q_end].unsqueeze(0)  # [1, H, q, D]
        if span.context_slots is None:
            ks = _as_stored(k[:, span.q_start : span.q_end], k_cache).unsqueeze(0)
            vs = _as_stored(v[:, span.q_start : span.q_end], v_cache).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            ks = k_cache.index_select(1, span.context_slots).to(q.dtype).unsqueeze(0)  # [1, Hkv, ctx, D]
            vs = v_cache.index_select(1, span.context_slots).to(q.dtype).unsqueeze(0)
            q_len = span.q_end - span.q_start
            offset = span.context_len - q_len
            rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
            allowed = torch.arange(span.context_len, device=q.device).unsqueeze(0) <= rows  # causal with the prefix
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scaling, enable_gqa=True)
        out[span.q_start : span.q_end] = o[0].transpose(0, 1)
    return out


def _as_stored(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x as the cache holds it: rounded to a half-precision cache's dtype (--kv-cache-dtype) and back, so
    that attention over this step's fresh keys and values sees what later steps will read back."""
    return x if x.dtype == cache.dtype else x.to(cache.dtype).to(x.dtype)


def _staged_context(layer: int, k, v, k_cache, v_cache, group: DecodeGroup, block_size: int):
    """The group's contexts as [Hkv, n, max_len, D] keys and values (views of the staged buffers)."""
    n = group.end - group.start
    max_len = group.mask.shape[-1]
    staged = group.staged.get(layer) if group.reuse else None
    if staged is not None:
        keys, values = staged
        rows = torch.arange(n, device=keys.device)
        keys[:, rows, group.lens - 1] = _as_stored(k[:, group.start : group.end], k_cache)
        values[:, rows, group.lens - 1] = _as_stored(v[:, group.start : group.end], v_cache)
    else:
        num_kv_heads, _, head_dim = k_cache.shape
        # Gather whole blocks (rows of block_size * D values), not single slots: fewer, longer copies.
        blocks = group.blocks.reshape(-1)
        gathered_len = group.blocks.shape[1] * block_size
        by_block = (num_kv_heads, -1, block_size * head_dim)
        shape = (num_kv_heads, n, group.capacity, head_dim)
        # Zeroed, not empty: the padding beyond each context is masked, but NaN * 0 would still be NaN.
        # In the compute dtype: a half-precision cache (--kv-cache-dtype) is widened as it is gathered.
        keys = torch.zeros(shape, dtype=k.dtype, device=k_cache.device)
        values = torch.zeros(shape, dtype=v.dtype, device=v_cache.device)
        gathered = (num_kv_heads, n, gathered_len, head_dim)
        keys[:, :, :gathered_len] = k_cache.view(by_block).index_select(1, blocks).view(gathered)
        values[:, :, :gathered_len] = v_cache.view(by_block).index_select(1, blocks).view(gathered)
        group.staged[layer] = (keys, values)
    return keys[:, :, :max_len], values[:, :, :max_len]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: DecodeGroup, scale: float):
    """All of a group's decodes at once: grouped-query scores against [Hkv, n, L, D] contexts.

    The cache is head-major, so contexts come out as [Hkv, n, L, D] and both products run as
    batched matmuls over (Hkv, n) with no copies.
    """
    num_heads, nd, head_dim = q.shape
    num_kv_heads = keys.shape[0]
    per_kv = num_heads // num_kv_heads  # query heads sharing each key/value head
    qg = q.view(num_kv_heads, per_kv, nd, head_dim).transpose(1, 2)  # [Hkv, nd, G, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [Hkv, nd, G, L]
    scores.mul_(scale)
    scores.add_(group.mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)  # [Hkv, nd, G, D]
    return out.permute(1, 0, 2, 3).reshape(nd, num_heads, head_dim)


def head_dim(config) -> int:
    """The attention head size of a transformers config (explicit, or hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _no_mask(*args, **kwargs) -> None:
    """Masks are built per step by the runner, not by transformers."""
    return None


def register() -> None:
    """Make `attn_implementation="bowline"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
