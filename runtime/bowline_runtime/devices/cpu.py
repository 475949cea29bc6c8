"""The CPU: always present, gloo for tensor parallelism, float32 by default (fastest on most CPUs)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from bowline_runtime.config import switch_on
from bowline_runtime.devices import host_memory
from bowline_runtime.devices.base import Device
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.kernels import linear_choice, quant_cpu
from bowline_runtime.kernels.decode_layers import DecodeLayers
from bowline_runtime.models.fused_ops import FusedOps

if TYPE_CHECKING:
    from bowline_runtime.models.packed_decoder import LayerLoop, PackedDecoder

logger = logging.getLogger(__name__)

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


class KernelLinear(kernels.KernelProduct, torch.nn.Module):
    """nn.Linear through Bowline's own float32 product (kernels/gemm.c), its weight packed once.

    At decode sizes it takes 0.8x oneDNN's time (no fixed per-call cost to speak of), at prefill
    sizes the same (see gemm.c); used where that kernel builds (an AVX-512 or AVX2 + FMA CPU and a C
    compiler) and measured fastest for the shape (kernels.linear_choice).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", kernels.pack_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().contiguous().clone())

    def _weight_pointers(self) -> tuple:
        return self.packed_weight.data_ptr(), kernels.pointer(self.bias)

    def c_linear(self) -> kernels.CLinear:
        weight, bias = self.weight_pointers()
        return kernels.CLinear(kernels.LINEAR_F32, 0, weight, None, None, bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gemm_rows(x, *self.weight_pointers(), self.out_features)


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

    def release_idle_memory(self) -> None:
        """Idle: the kept activations go back to the kernel (see devices.host_memory), so RSS is bounded."""
        host_memory.release_freed_memory()

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

    def decode_layers(self, decoder: PackedDecoder) -> LayerLoop | None:
        """The C layer loop (kernels.decode_layers) where every product is a C kernel: about 1 ms a step less."""
        return DecodeLayers.of(decoder)

    def fused_ops(self, dtype: torch.dtype) -> FusedOps:
        """The C versions (float32, where the kernels build), else the torch reference."""
        ops = kernels.fused_ops() if dtype == torch.float32 else None
        return ops or FusedOps()

    def optimize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Serve every Linear by what measured fastest for its shape here (kernels.linear_choice):
        Bowline's own product (KernelLinear, float32, where gemm.c builds), oneDNN-packed (where this
        torch build and CPU pack that dtype, see onednn_packs) or plain torch (bfloat16 on an AVX2-only
        CPU), except the decoder layers' products, which take our kernel wherever it builds (the C layer
        loop needs all of them; LinearChooser.replacement). One packed weight per Linear is kept.
        BOWLINE_CPU_LINEAR forces a choice;
        BOWLINE_CPU_PACKED_LINEAR=0 keeps plain torch everywhere. Quantized layers go first to their
        fused dequantize-and-multiply kernels (kernels.quant_cpu)."""
        quant_cpu.swap_quantized(model)
        chooser = LinearChooser()
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                replacement = chooser.replacement(child, in_layer_loop=child_name in LAYER_LOOP_PRODUCTS)
                if replacement is not None:
                    setattr(module, child_name, replacement)
        chooser.finish()
        return model


# The packed decoder's fused products (models.packed_decoder.fuse_projections) and o/down: what the C layer loop calls.
LAYER_LOOP_PRODUCTS = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})

_BUILDERS: dict[str, Callable[[torch.nn.Linear], torch.nn.Module]] = {
    "kernel": lambda linear: KernelLinear(linear),
    "onednn": lambda linear: OneDnnLinear(linear),
}


class LinearChooser:
    """The measuring edge around linear_choice.choose: per shape once per process, cached on disk."""

    def __init__(self) -> None:
        self._path = kernels.cache_dir() / "linear_choice.json"
        self._disk = linear_choice.load_cache(self._path)
        self._dirty = False
        self._seen: dict[str, str] = {}
        self._signature: str | None = None  # kernels.speed_signature(), read once: it hashes the kernel sources

    def available(self, dtype: torch.dtype) -> list[str]:
        if not switch_on(PACKED_LINEAR_ENV):
            return ["torch"]
        names = ["kernel"] if dtype == torch.float32 and kernels.gemm_available() else []
        if dtype in (torch.float32, torch.bfloat16) and onednn_packs(dtype):
            names.append("onednn")
        return [*names, "torch"]

    def replacement(self, linear: torch.nn.Linear, in_layer_loop: bool = False) -> torch.nn.Module | None:
        """`in_layer_loop`: one of the packed decoder's layer products (LAYER_LOOP_PRODUCTS), which take our
        kernel wherever it builds, unmeasured: only with all four as C kernels does a decode step run as one
        C call (kernels.decode_layers), which saves more than any one shape's choice can (see there)."""
        dtype = linear.weight.dtype
        available = self.available(dtype)
        name = linear_choice.forced_choice(available)
        if name is None and in_layer_loop and "kernel" in available:
            name = "kernel"
        if name is None:
            name = self._measured(linear, available)
        return None if name == "torch" else _BUILDERS[name](linear)

    def _measured(self, linear: torch.nn.Linear, available: list[str]) -> str:
        if len(available) == 1:
            return available[0]
        n, k, dtype = linear.out_features, linear.in_features, linear.weight.dtype
        if self._signature is None:
            self._signature = kernels.speed_signature()
        key = linear_choice.cache_key(self._signature, dtype, n, k, linear.bias is not None)
        if key in self._seen:
            return self._seen[key]
        entry = self._disk.get(key)
        if entry is not None and set(available) <= set(entry.get("us", {})):
            # The cache keeps timings, the choice is made again: a change of rule applies to cached shapes.
            timings = {name: {int(rows): us for rows, us in entry["us"][name].items()} for name in available}
            entry = {"choice": linear_choice.choose(timings), "us": timings}
        else:
            timings = {}
            before = linear_choice.cpu_ticks()
            for name in available:
                module = linear if name == "torch" else _BUILDERS[name](linear)
                timings[name] = linear_choice.measure(module, k, dtype)
                del module  # one extra packed weight at a time
            busy = linear_choice.others_share(before, linear_choice.cpu_ticks())
            if busy > linear_choice.BUSY_SHARE:
                # Timings taken under load are noise: use the measured rule, remember nothing on disk.
                entry = {"choice": linear_choice.fallback_choice(available), "us": timings}
                logger.warning("Linear %dx%d: other processes took %.0f%% of the CPU while it was measured; "
                               "using %s, not cached", n, k, 100 * busy, entry["choice"])
            else:
                entry = {"choice": linear_choice.choose(timings), "us": timings}
                self._disk[key] = entry
                self._dirty = True
        us = ", ".join(f"{c} " + "/".join(f"{t:.0f}" for t in entry["us"][c].values()) for c in entry["us"])
        logger.info("Linear %dx%d %s: %s (us at rows %s: %s)", n, k, str(dtype).removeprefix("torch."),
                    entry["choice"], "/".join(map(str, linear_choice.ROW_WEIGHTS)), us)
        self._seen[key] = entry["choice"]
        return entry["choice"]

    def finish(self) -> None:
        if self._dirty:
            try:
                linear_choice.save_cache(self._path, self._disk)
            except OSError as exc:
                logger.warning("could not cache the Linear choices (%s)", exc)

    @property
    def chosen(self) -> dict[str, str]:
        return dict(self._seen)
