"""A decode step's whole layer loop in one C call (kernels/decode_layers.c), for the packed decoder.

Why: the packed decoder's Python loop makes ten C calls per layer and, around each, a few microseconds
of tensor bookkeeping; on the bench model that is about 1 ms a step, a fifth of a 4-bit batch-1 step.
`DecodeLayers.of` describes the model once (every Linear's kernel and weight pointers, the norms, the
shapes), after the device has packed its weights, which stay where they are from then on (the engine
never moves a loaded model); each pure-decode step then fills one small struct and makes one call. The C loop runs the
same kernels in the same order on the same buffers, so its numbers are the Python loop's exactly.

Taken only where it computes the same thing: float32, every product one of the C kernels (so no
tensor-parallel shards, which need an all-reduce between products), no per-head q/k norms (Qwen3),
and per step only decodes in one attention group, without LoRA adapters. Anything else keeps the
Python loop. BOWLINE_DECODE_LAYERS=0 switches it off (for A/B measurements, or to rule it out).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from bowline_runtime.config import switch_on
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.models.attention import AttentionMetadata

if TYPE_CHECKING:
    from bowline_runtime.models.packed_decoder import PackedDecoder

DECODE_LAYERS_ENV = "BOWLINE_DECODE_LAYERS"

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("out_features", _i64), ("in_features", _i64), ("group_size", _i64),
                ("weight", _p), ("scale", _p), ("zero_scale", _p), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _p), ("post_norm", _p), ("in_eps", _f32), ("post_eps", _f32),
                ("k_cache", _p), ("v_cache", _p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("intermediate", _i64), ("rot_dim", _i64), ("cos", _p), ("sin", _p), ("slots", _p),
                ("tables", _p), ("lens", _p), ("table_stride", _i64), ("num_slots", _i64), ("block_size", _i64),
                ("kv_kind", _i64), ("scale", _f32), ("residual", _p), ("out", _p), ("x", _p), ("qkv", _p),
                ("attn", _p), ("gate_up", _p), ("act", _p), ("rounded", _p)]


def _linear(layer: object, out_features: int, in_features: int) -> _Linear | None:
    """The C description of one product, or None where it is not a C kernel of the expected shape."""
    if not isinstance(layer, kernels.KernelProduct):
        return None
    if (layer.out_features, layer.in_features) != (out_features, in_features):
        return None
    c = layer.c_linear()
    return _Linear(c.kind, out_features, in_features, c.group_size, c.weight, c.scale, c.zero_scale, c.bias)


class DecodeLayers:
    """Callable (hidden [T, hidden] float32, the stream, updated in place; cos, sin [T, rot_dim]; meta)
    -> the last layer's down product [T, hidden], not yet added to the stream."""

    def __init__(self, layers: list[_Layer], widths: dict[str, int], scale: float, lib: ctypes.CDLL) -> None:
        self._layers = (_Layer * len(layers))(*layers)
        self._num_layers = len(layers)
        self._w = widths
        self._scale = scale
        self._lib = lib
        self._caches: list | None = None  # the KV cache list the layer structs point into
        self._cache_ptr = 0  # its first key cache's data, to notice a cache reallocated in place of the list's

    @classmethod
    def of(cls, decoder: PackedDecoder) -> DecodeLayers | None:
        """The C loop for `decoder`'s model as loaded (after the device swapped in its kernels), or None."""
        lib = kernels.load()
        if lib is None or not switch_on(DECODE_LAYERS_ENV) or not decoder.layers:
            return None
        model: Any = decoder.model
        hidden, d = int(model.config.hidden_size), decoder.head_dim
        first: Any = decoder.layers[0]
        sizes = getattr(first.attn, "qkv_sizes", None)
        gate_up = getattr(first.mlp, "gate_up_proj", None)
        if sizes is None or gate_up is None or decoder.final_norm[0].dtype != torch.float32:
            return None
        heads, kv_heads, intermediate = sizes[0] // d, sizes[1] // d, int(gate_up.out_features) // 2
        qkv_width = (heads + 2 * kv_heads) * d
        layers, scales = [], set()
        for layer in decoder.layers:
            attn: Any = layer.attn
            mlp: Any = layer.mlp
            if layer.q_norm is not None or getattr(attn, "qkv_sizes", None) != (heads * d, kv_heads * d, kv_heads * d):
                return None
            parts = (
                _linear(attn.qkv_proj, qkv_width, hidden), _linear(attn.o_proj, hidden, heads * d),
                _linear(getattr(mlp, "gate_up_proj", None), 2 * intermediate, hidden),
                _linear(mlp.down_proj, hidden, intermediate),
            )
            if any(p is None for p in parts):
                return None
            (in_w, in_eps), (post_w, post_eps) = layer.input_norm, layer.post_norm
            if not (in_w.is_contiguous() and post_w.is_contiguous()):
                return None
            layers.append(_Layer(in_w.data_ptr(), post_w.data_ptr(), in_eps, post_eps, None, None, *parts))
            scales.add(float(attn.scaling))
        if len(scales) != 1:
            return None
        widths = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
                  "intermediate": intermediate, "qkv": qkv_width}
        return cls(layers, widths, scales.pop(), lib)

    def accepts(self, meta: AttentionMetadata, tokens: int) -> bool:
        """Whether this step is one the C loop computes: only decodes, in one group, the C attention."""
        groups = meta.decode_groups
        return (
            not meta.prefills and len(groups) == 1 and groups[0].start == 0 and groups[0].end == tokens
            and meta.decode_kernel is kernels.paged_decode_attention and len(meta.kv_caches) == self._num_layers
        )

    def _bind_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k_cache, v_cache) in zip(self._layers, caches, strict=True):
            if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype):
                raise ValueError("the KV cache must be contiguous, keys and values of one dtype")
            layer.k_cache, layer.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        self._caches = caches
        self._cache_ptr = caches[0][0].data_ptr()
        self._kv_kind = kernels.kv_kind(caches[0][0].dtype)

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        caches = meta.kv_caches
        if caches is not self._caches or caches[0][0].data_ptr() != self._cache_ptr:
            self._bind_caches(caches)
        w = self._w
        tokens, width = hidden.shape
        if width != w["hidden"] or hidden.dtype != torch.float32 or not hidden.is_contiguous():
            raise ValueError(f"expected contiguous float32 [T, {w['hidden']}] hidden states")
        q_width, inter = w["heads"] * w["head_dim"], w["intermediate"]
        # One allocation for every buffer the layers reuse: out, x, qkv, attn, gate_up, act, rounded.
        sizes = (w["hidden"], w["hidden"], w["qkv"], q_width, 2 * inter, inter, max(w["hidden"], inter, q_width))
        scratch = torch.empty(tokens * sum(sizes), dtype=torch.float32)
        base, offsets = scratch.data_ptr(), []
        for size in sizes:
            offsets.append(base)
            base += tokens * size * 4
        cos, sin = cos.contiguous(), sin.contiguous()
        group = meta.decode_groups[0]
        tables, lens, slots = group.blocks.contiguous(), group.lens.contiguous(), meta.slot_mapping.contiguous()
        k_cache = caches[0][0]
        step = _Step(
            tokens, w["hidden"], w["heads"], w["kv_heads"], w["head_dim"], inter, cos.shape[-1],
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), tables.shape[1],
            k_cache.shape[1], meta.block_size, self._kv_kind, self._scale, hidden.data_ptr(), *offsets,
        )
        self._lib.bowline_decode_layers_f32(self._layers, self._num_layers, ctypes.byref(step),
                                            torch.get_num_threads())
        return scratch[: tokens * w["hidden"]].view(tokens, w["hidden"])
