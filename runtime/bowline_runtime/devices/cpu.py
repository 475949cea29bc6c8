"""The CPU: always present, gloo for tensor parallelism, float32 by default (fastest on most CPUs)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from bowline_runtime.config import switch_on
from bowline_runtime.devices import host_memory
from bowline_runtime.devices.base import Device
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.models.fused_ops import FusedOps

# Rows per product that oneDNN lays the packed weights out for; any row count works, this one is typical of decode.
_PACK_BATCH_HINT = 16


# Set to 0 to keep plain nn.Linear (for before/after benchmarks, or a torch build whose oneDNN misbehaves).
PACKED_LINEAR_ENV = "BOWLINE_CPU_PACKED_LINEAR"


def _onednn_linear_available() -> bool:
    if not switch_on(PACKED_LINEAR_ENV):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed Linear works for `dtype` on this CPU, found by packing a tiny weight once.

    Why a probe and not a flag table: oneDNN's bfloat16 reorder needs avx_ne_convert or AVX-512
    (bw, vl, dq); on an AVX2-only EPYC Zen 3 it raises `mkldnn_reorder_linear_weight: bf16 path needs
    the cpu support ...` at start-up. Which features a torch build asks for changes between versions;
    trying it costs well under a millisecond and is exactly the question.
    """
    if not _onednn_linear_available():
        return False
    try:
        weight = torch.zeros(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class OneDnnLinear(torch.nn.Module):
    """nn.Linear with its weight pre-packed once into oneDNN's blocked layout.

    Measured on 2-core EPYC with float32: 2-3x faster than `F.linear` for the engine's shapes, from
    1-row decode through 2048-row prefill (the blocked layout streams the weight at near memory speed
    where MKL's skinny-matrix path does not). The same trick torch.compile's CPU freezing applies.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class KernelLinear(torch.nn.Module):
    """nn.Linear through Bowline's own float32 product (kernels/gemm.c), its weight packed once.

    At decode sizes it takes 0.8x oneDNN's time (no fixed per-call cost to speak of), at prefill
    sizes the same (see gemm.c); used where that kernel builds (an AVX-512 CPU and a C compiler).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", kernels.pack_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().contiguous().clone())
        self._linear = kernels.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self._linear(x.reshape(-1, self.in_features), self.packed_weight, self.bias, self.out_features)
        return out.view(*lead, self.out_features)


class CpuDevice(Device):
    type = "cpu"
    dist_backend = "gloo"
    stages_decode_context = True
    # A CPU prefills ~0.15 ms per token (bench model, 2 cores): 512-token chunks keep steps near 80 ms, where
    # 2048 let eight 128-token prompts arriving together all wait ~150 ms for one step. Measured in process,
    # 128 -> 128 at concurrency 8: mean TTFT 161 -> 79 ms for 1 % less throughput.
    default_max_num_batched_tokens = 512

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_info(self, rank: int = 0) -> tuple[int, int]:
        try:
            pages, free_pages, page = (os.sysconf(n) for n in ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES", "SC_PAGE_SIZE"))
            return free_pages * page, pages * page
        except (ValueError, OSError):  # not POSIX: claim nothing is known
            return 0, 0

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def prepare_process(self) -> None:
        """Keep freed activations mapped (see devices.host_memory): a 512-token prefill 110 -> 80 ms."""
        host_memory.keep_freed_memory()

    def paged_decode_kernel(self, dtype: torch.dtype) -> Callable[..., None] | None:
        """The C kernel of bowline_runtime.kernels (float32; built on first use, cached), if it builds here."""
        if dtype != torch.float32 or kernels.load() is None:
            return None
        return kernels.paged_decode_attention

    def paged_prefill_kernel(self, dtype: torch.dtype, head_dim: int) -> Callable[..., None] | None:
        """The C prefill kernel (float32; its inner loops step 16 floats, so head sizes in multiples of 16)."""
        if dtype != torch.float32 or head_dim % kernels.PREFILL_HEAD_DIM_MULTIPLE or kernels.load() is None:
            return None
        return kernels.paged_prefill_attention

    def paged_cache_writer(self, dtype: torch.dtype) -> Callable[..., None] | None:
        """The C cache write (float32), one call for keys and values."""
        if dtype != torch.float32 or kernels.load() is None:
            return None
        return kernels.write_kv_cache

    def fused_ops(self, dtype: torch.dtype) -> FusedOps:
        """The C versions (float32, where the kernels build), else the torch reference."""
        ops = kernels.fused_ops() if dtype == torch.float32 else None
        return ops or FusedOps()

    def optimize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Pack every Linear once: float32 for Bowline's own product where it builds (KernelLinear), else
        float32/bfloat16 for oneDNN where this torch build and CPU pack that dtype (see onednn_packs),
        else plain nn.Linear (bfloat16 on an AVX2-only CPU)."""
        own_kernel = switch_on(PACKED_LINEAR_ENV) and kernels.gemm_available()
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                if own_kernel and child.weight.dtype == torch.float32:
                    setattr(module, child_name, KernelLinear(child))
                elif child.weight.dtype in (torch.float32, torch.bfloat16) and onednn_packs(child.weight.dtype):
                    setattr(module, child_name, OneDnnLinear(child))
        return model
