"""A lean forward pass over a transformers Llama-family model's own modules and weights.

transformers' forward is written for every use (training, generation caches, output capture,
masks): per layer it passes through a dozen wrappers and about forty small operators. For a packed
batch with paged attention none of that is needed. This forward walks the same modules (so weights,
tensor-parallel shards and device-swapped Linear layers are used as loaded) and does per layer
only: norm, q/k/v, rotary, paged attention, o, add+norm, gate/up, SiLU*up, down, with the small
operations fused by the device's `FusedOps` and q/k/v and gate/up computed as one product each
(`fuse_projections`). On the bench model (2 CPU cores, in process) a batch-1 decode step went from
6.1 to 4.6 ms, 16 sequences from 9.9 to 8.5 ms, a 512-token prefill from 79 to 74 ms.

It takes the residual stream vLLM's way: each block's output is added to the stream by the norm
that follows it (`add_rms_norm`), so no separate residual adds are made.

Architectures whose layers are exactly this (Llama, Mistral, Qwen2, Qwen3) take it; any other
keeps transformers' forward, which the paged attention also serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from bowline_runtime.lora.delta import LoRABatch
from bowline_runtime.models.attention import AttentionMetadata, attend, head_dim
from bowline_runtime.models.fused_ops import FusedOps
from bowline_runtime.models.rotary_table import RotaryTable

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Set to 0 to run transformers' own forward (for before/after benchmarks, or to rule this one out).
PACKED_DECODER_ENV = "BOWLINE_PACKED_DECODER"


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def supports(model: nn.Module) -> bool:
    """Whether `model`'s layers are the plain pre-norm Llama block this forward computes."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "layer_idx"):
            return False
        if not hasattr(attn, "o_proj") or not (
            hasattr(attn, "qkv_proj") or all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        ):
            return False
        if not hasattr(mlp, "down_proj") or not (
            hasattr(mlp, "gate_up_proj") or all(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
        ):
            return False
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            return False
    return hasattr(model, "lm_head")


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side."""
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(parts[0].in_features, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(p.bias is not None for p in parts):
        fused.bias = nn.Parameter(torch.cat([
            p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features) for p in parts
        ]), requires_grad=False)
    return fused


def _concat(parts: list) -> nn.Module | None:
    """The parts joined by output columns: nn.Linear, or quantized layers of one kind (their `concat`)."""
    if all(type(p) is nn.Linear for p in parts):
        return _concat_linears(parts)
    kind = type(parts[0])
    if hasattr(kind, "concat") and all(type(p) is kind for p in parts):
        return kind.concat(parts)
    return None


def fuse_projections(model: nn.Module) -> None:
    """Replace each layer's q/k/v by one `qkv_proj` and gate/up by one `gate_up_proj`, in place.

    Every product has a fixed cost per call (oneDNN's is ~15 us on the CPU, whatever its size), and
    at decode sizes that cost is most of a small product's time: on the bench model at 16 rows, one
    q/k/v product takes 50 us against 71 us for three. The outputs are split again as views, so no
    copy is added. Only plain nn.Linear layers, or quantized layers of one kind (models.quant_linear),
    are fused (before a device swaps in its own kernels); layers fused already, or of another kind,
    are left as they are. transformers' own forward no
    longer runs on a fused model: only this decoder does.
    """
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        fused = _concat(parts) if all(p is not None for p in parts) else None
        if fused is not None:
            attn.qkv_proj = fused
            attn.qkv_sizes = tuple(p.out_features for p in parts)
            del attn.q_proj, attn.k_proj, attn.v_proj
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        fused = _concat(parts) if all(p is not None for p in parts) else None
        if fused is not None and parts[0].out_features == parts[1].out_features:
            mlp.gate_up_proj = fused
            del mlp.gate_proj, mlp.up_proj


class LayerLoop(Protocol):
    """A device's whole layer loop in one call, for the steps it `accepts` (kernels.decode_layers on the CPU)."""

    def accepts(self, meta: AttentionMetadata, tokens: int) -> bool: ...

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden] (the stream, updated in place) -> the last layer's output, not yet added to it."""
        ...


@dataclass(slots=True)
class PackedLayer:
    """One decoder layer as the lean forward reads it."""

    attn: nn.Module  # the attention block (fused qkv_proj where fuse_projections could)
    mlp: nn.Module  # the MLP (fused gate_up_proj where it could)
    input_norm: tuple[torch.Tensor, float]  # RMSNorm (weight, eps) before attention
    post_norm: tuple[torch.Tensor, float]  # RMSNorm (weight, eps) before the MLP
    q_norm: nn.Module | None  # Qwen3 normalises each head's query and key before the rotary embedding
    k_norm: nn.Module | None


class PackedDecoder:
    """Callable (input_ids [T], positions [T], keep [K], attention metadata) -> logits [K, vocab]."""

    def __init__(self, model: nn.Module, ops: FusedOps) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama-family decoder")
        fuse_projections(model)
        self.model = model
        self.ops = ops
        base = model.model
        self.embed = base.embed_tokens
        self.rotary = RotaryTable(base.rotary_emb)
        self.final_norm = (base.norm.weight, _eps(base.norm))
        self.head_dim = head_dim(model.config)
        self.layers = [
            PackedLayer(
                attn=layer.self_attn,
                mlp=layer.mlp,
                input_norm=(layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                post_norm=(layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
                q_norm=getattr(layer.self_attn, "q_norm", None),
                k_norm=getattr(layer.self_attn, "k_norm", None),
            )
            for layer in base.layers
        ]
        # The device's one-call layer loop (Device.decode_layers), set once the device has swapped in its
        # kernels; None: every step runs the loop in __call__.
        self.decode_layers: LayerLoop | None = None

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, meta: AttentionMetadata,
        lora: LoRABatch | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`lora`: the step's adapter rows (lora.delta); each base product then gets their updates added.
        `inputs_embeds` [T, hidden] replaces the token embeddings (image features merged in)."""
        ops, d = self.ops, self.head_dim
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [T, hidden]
        num_tokens = hidden.shape[0]
        cos, sin = self.rotary(hidden, positions)  # [T, rot_dim] each
        fast = self.decode_layers
        if lora is None and fast is not None and fast.accepts(meta, num_tokens):
            hidden = hidden.contiguous()
            out = fast(hidden, cos, sin, meta)
            return self.model.lm_head(ops.add_rms_norm(out, hidden, *self.final_norm)[keep])
        residual = hidden  # the stream; each add_rms_norm adds a block's output to it in place
        out = None  # the previous block's output, not yet added to the stream
        for index, layer in enumerate(self.layers):
            attn, mlp, in_norm, post_norm, q_norm, k_norm = (
                layer.attn, layer.mlp, layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm
            )
            x = ops.rms_norm(hidden, *in_norm) if out is None else ops.add_rms_norm(out, residual, *in_norm)
            q, k, v, qk = _qkv(attn, x, d, lora, index)
            if q_norm is not None:  # Qwen3's per-head norms make new query and key tensors
                q = ops.rms_norm(q.reshape(-1, d), q_norm.weight, _eps(q_norm)).view(num_tokens, -1, d)
                k = ops.rms_norm(k.reshape(-1, d), k_norm.weight, _eps(k_norm)).view(num_tokens, -1, d)
                qk = None
            if qk is not None:  # query and key heads side by side in one product: one rotation
                ops.rotary(qk, cos, sin)
            else:
                ops.rotary(q, cos, sin)
                ops.rotary(k, cos, sin)
            attended = attend(attn.layer_idx, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn.scaling,
                              meta).view(num_tokens, -1)
            o = attn.o_proj(attended)
            if lora is not None:
                lora.add(index, "o", attended, [o])
            x = ops.add_rms_norm(o, residual, *post_norm)
            act = _activation(ops, mlp, x, lora, index)
            out = mlp.down_proj(act)
            if lora is not None:
                lora.add(index, "down", act, [out])
        final = ops.rms_norm(hidden, *self.final_norm) if out is None else ops.add_rms_norm(out, residual, *self.final_norm)
        return self.model.lm_head(final[keep])


def _qkv(
    attn: nn.Module, x: torch.Tensor, head_dim: int, lora: LoRABatch | None = None, layer: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries, keys and values of x [T, hidden] as [T, heads, head_dim] each, and, where one fused
    product made them, the query and key heads together as one view (None otherwise).

    Why the joint view: the fused product's row is [q heads | k heads | v heads], so the query and key
    heads that the rotary embedding turns are adjacent. One rotary call over both saves a call per
    layer, and taking the three as head slices of one view saves a split and three reshapes. These
    small calls are mostly Python and ctypes, 5-20 us each inside a step.
    """
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(x)
        if lora is not None:
            lora.add(layer, "qkv", x, [qkv])
        heads = qkv.view(qkv.shape[0], -1, head_dim)
        q_heads, k_heads = attn.qkv_sizes[0] // head_dim, attn.qkv_sizes[1] // head_dim
        qk_heads = q_heads + k_heads
        return heads[:, :q_heads], heads[:, q_heads:qk_heads], heads[:, qk_heads:], heads[:, :qk_heads]
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if lora is not None:
        lora.add(layer, "qkv", x, [q, k, v])
    tokens = x.shape[0]
    return q.view(tokens, -1, head_dim), k.view(tokens, -1, head_dim), v.view(tokens, -1, head_dim), None


def _activation(ops: FusedOps, mlp: nn.Module, x: torch.Tensor, lora: LoRABatch | None = None, layer: int = 0) -> torch.Tensor:
    """silu(gate(x)) * up(x): from the fused gate/up product's halves in one call where fused."""
    if hasattr(mlp, "gate_up_proj"):
        gate_up = mlp.gate_up_proj(x)
        if lora is not None:
            lora.add(layer, "gate_up", x, [gate_up])
        return ops.silu_mul_halves(gate_up)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if lora is not None:
        lora.add(layer, "gate_up", x, [gate, up])
    return ops.silu_mul(gate, up)
