"""Builds, caches and calls Bowline's C kernels for the CPU (through ctypes).

Why C and not torch ops: decode attention over a paged cache is, in torch, a gather of every
context into a padded dense tensor followed by two batched products; the gather costs as much memory
traffic as the attention itself, and padding/masking more again. `paged_decode.c` reads each key and
value row once, straight from its block. `paged_prefill.c` is a flash-attention loop over the same
cache, 2x torch's CPU SDPA at 1,000 causal tokens (no gather or mask for chunks after the first).
Plain C (no torch headers) compiles in about a second with the system's C compiler; the library is
cached per source, flags and CPU, so later starts only load it. Without a compiler, or with
BOWLINE_CPU_KERNELS=0, the engine keeps its torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from bowline_runtime.config import switch_on
from bowline_runtime.models.fused_ops import FusedOps

logger = logging.getLogger(__name__)

KERNELS_ENV = "BOWLINE_CPU_KERNELS"
CACHE_ENV = "BOWLINE_KERNEL_CACHE"
# native (the default) builds for this CPU; avx2 builds for AVX2 + FMA only (x86-64-v3, no AVX-512), so an
# AVX-512 machine runs and measures the code an AVX2-only CPU (an EPYC Zen 3, say) gets.
ISA_ENV = "BOWLINE_CPU_KERNEL_ISA"
_ISA_MARCH = {"native": "-march=native", "avx2": "-march=x86-64-v3"}
_SOURCES = tuple(
    Path(__file__).with_name(name) for name in (
        "paged_decode.c", "paged_prefill.c", "fused.c", "gemm.c", "quant_gemm.c", "lora.c", "decode_layers.c"
    )
)
_HEADERS = (Path(__file__).with_name("kv_cache.h"),)  # part of the library's identity, not compiled alone

# The KV cache element types the C kernels read and write (kv_cache.h's KV_F32, KV_F16, KV_BF16).
KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def kv_kind(dtype: torch.dtype) -> int:
    """kv_cache.h's number for a cache of `dtype` (float32, float16 or bfloat16)."""
    try:
        return KV_KINDS[dtype]
    except KeyError:
        raise ValueError(f"the CPU kernels read float32, float16 or bfloat16 KV caches, not {dtype}") from None
# -ffast-math lets the softmax's expf and the dot products vectorise; -fopenmp shares the libgomp torch loaded.
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
# Linked without -ffast-math: given at link time, gcc adds crtfastmath.o, whose constructor switches the
# whole process to flush-to-zero/denormals-are-zero the moment the library loads, changing the
# numbers of torch and of every other library in the process (subnormal floats become 0).
_LINK_FLAGS = ("-shared", "-fopenmp")

# paged_prefill.c's inner loops step VL = 16 floats through the head dimension.
PREFILL_HEAD_DIM_MULTIPLE = 16

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bowline" / "kernels"


def cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def compile_flags() -> tuple[str, ...]:
    """_FLAGS with the -march that BOWLINE_CPU_KERNEL_ISA asks for (native unless set)."""
    isa = os.environ.get(ISA_ENV, "").strip().lower() or "native"
    if isa not in _ISA_MARCH:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(_ISA_MARCH)}, not {isa!r}")
    return tuple(_ISA_MARCH[isa] if flag == "-march=native" else flag for flag in _FLAGS)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_key(compiler: str) -> str:
    """The library's identity: its sources, flags, compiler and CPU (the name of the cached build)."""
    sources = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    return hashlib.sha256(b"\0".join([*sources, " ".join(compile_flags() + _LINK_FLAGS).encode(), compiler.encode(),
                                      cpu_signature().encode()])).hexdigest()[:16]


def speed_signature() -> str:
    """What the speed of a Linear depends on here: the CPU and, where the kernels build, the library
    (a changed gemm.c or another BOWLINE_CPU_KERNEL_ISA must be measured again, not read from a cache)."""
    compiler = _compiler() if switch_on(KERNELS_ENV) else None
    return cpu_signature() if compiler is None else f"{cpu_signature()}|kernels {library_key(compiler)}"


def build(compiler: str) -> Path:
    """Compile the kernels (once per source, flags, compiler and CPU) and return the library's path."""
    flags = compile_flags()
    target = cache_dir() / f"bowline_cpu_kernels-{library_key(compiler)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent starts (tensor-parallel ranks) never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    objects = [f"{tmp}.{i}.o" for i in range(len(_SOURCES))]
    try:
        for source, obj in zip(_SOURCES, objects, strict=True):
            subprocess.run([compiler, *flags, "-c", str(source), "-o", obj], check=True, capture_output=True, text=True)
        subprocess.run([compiler, *_LINK_FLAGS, *objects, "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        for path in (tmp, *objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (disabled, no compiler, or the build failed: logged once)."""
    if not switch_on(KERNELS_ENV):
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU attention uses the slower torch path")
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("CPU kernels could not be built (%s): attention uses the torch path", detail)
        return None
    fn = lib.bowline_paged_decode_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _p, _int, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _p, _int]
    fn = lib.bowline_paged_prefill_f32
    fn.restype = None
    fn.argtypes = [_p, _p, _p, _int, _p, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _p, _int]
    fn = lib.bowline_rms_norm_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _p, _p, _i64, _i64, _f32, _int]
    fn = lib.bowline_silu_mul_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _i64, _p, _i64, _i64, _int]
    fn = lib.bowline_rotary_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _i64, _int]
    fn = lib.bowline_argmax_rows_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _i64, _i64, _p]
    fn = lib.bowline_write_kv_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _i64, _p, _p, _int, _p, _i64, _i64, _i64, _i64, _int]
    lib.bowline_quant_panel_width.restype = _i64
    lib.bowline_quant_panel_width.argtypes = []
    fn = lib.bowline_q8_gemm_f32  # quantized Linear layers (quant_gemm.c, see kernels.quant_cpu)
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _int]
    fn = lib.bowline_q4_gemm_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _int]
    fn = lib.bowline_f16_gemm_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64, _int]
    fn = lib.bowline_quantize_rows_f32
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _i64, _i64]
    fn = lib.bowline_decode_layers_f32  # a decode step's whole layer loop (decode_layers.c, see kernels.decode_layers)
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _int]
    lib.bowline_lora_table_width.restype = _i64
    lib.bowline_lora_table_width.argtypes = []
    fn = lib.bowline_lora_f32  # LoRA updates (lora.c, see lora.delta)
    fn.restype = None
    fn.argtypes = [_p, _i64, _p, _i64, _i64, _i64, _p, _p, _p, _p, _i64, _int, _int]
    if hasattr(lib, "bowline_gemm_f32"):  # compiled only for AVX-512 and AVX2 + FMA targets (see gemm.c)
        lib.bowline_gemm_panel_width.restype = _i64
        lib.bowline_gemm_panel_width.argtypes = []
        fn = lib.bowline_gemm_pack_f32
        fn.restype = None
        fn.argtypes = [_p, _i64, _i64, _p, _int]
        fn = lib.bowline_gemm_f32
        fn.restype = None
        fn.argtypes = [_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64, _int]
    return lib


def _library_for(k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> ctypes.CDLL:
    """The loaded library, once the tensors the kernels address by raw pointer are known to be contiguous."""
    lib = load()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()):
        raise ValueError("the KV cache and the output must be contiguous")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"keys and values must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    return lib


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    lens: torch.Tensor, scale: float, block_size: int, out: torch.Tensor,
) -> None:
    """out[i] = attention of q[:, i] over sequence i's cached context (CPU; float32 queries and output, a
    float32, float16 or bfloat16 cache read as float32).

    q: [H, n, D] (any strides; no copy where each token's heads are contiguous, as in a view of the
    fused q/k/v product); k_cache, v_cache: [Hkv, S, D] contiguous; block_tables: [n, W] int64;
    lens: [n] int64 (this step's token included); out: [n, H, D] contiguous, written in place.
    """
    lib = _library_for(k_cache, v_cache, out)
    num_heads, n, head_dim = q.shape
    q = q.transpose(0, 1)  # [n, H, D]
    if not (q.stride(2) == 1 and q.stride(1) == head_dim):
        q = q.contiguous()
    tables = block_tables.contiguous()
    lens = lens.contiguous()
    lib.bowline_paged_decode_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), kv_kind(k_cache.dtype),
        tables.data_ptr(), tables.shape[1],
        lens.data_ptr(), n, num_heads, k_cache.shape[0], head_dim, k_cache.shape[1], block_size,
        float(scale), out.data_ptr(), torch.get_num_threads(),
    )


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache[:, slots[t]] = k[:, t] and the same for v (float32 in; the cache float32, float16 or
    bfloat16, rounded to nearest even; CPU), in one call.

    k, v: [Hkv, T, D] (the layer's new keys and values as attention receives them; any row stride,
    but each token's heads contiguous); caches [Hkv, S, D] contiguous; slots [T] int64.
    """
    lib = _library_for(k_cache, v_cache, k_cache)
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [T, Hkv, D] views
    num_kv_heads, tokens, head_dim = k.shape
    if not all(t.stride(2) == 1 and t.stride(1) == head_dim for t in (kt, vt)):
        kt, vt = kt.contiguous(), vt.contiguous()
    slots = slots.contiguous()
    lib.bowline_write_kv_f32(
        kt.data_ptr(), kt.stride(0), vt.data_ptr(), vt.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        kv_kind(k_cache.dtype), slots.data_ptr(), tokens, num_kv_heads, head_dim, k_cache.shape[1],
        torch.get_num_threads(),
    )


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, scale: float,
    out: torch.Tensor,
) -> None:
    """out = causal attention of one sequence's prefill chunk over its cached context (CPU; float32
    queries and output, a float32, float16 or bfloat16 cache).

    q: [H, n, D] (any strides), the chunk's queries at positions len(slots) - n .. len(slots) - 1;
    slots: [ctx_len] int64, the cache slot of every position so far, this chunk's included (its keys
    and values already written); out: [n, H, D] contiguous, written in place.
    """
    lib = _library_for(k_cache, v_cache, out)
    num_heads, n, head_dim = q.shape
    q = q.contiguous()
    slots = slots.contiguous()
    lib.bowline_paged_prefill_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_kind(k_cache.dtype), slots.data_ptr(),
        slots.shape[0], n, num_heads, k_cache.shape[0], head_dim, k_cache.shape[1], float(scale), out.data_ptr(),
        torch.get_num_threads(),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as rows the C loops can stride over: 2-D float32 with unit stride along each row."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"expected 2-D float32 rows, got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


class CpuFusedOps(FusedOps):
    """models.fused_ops in C (kernels/fused.c), float32: one pass over memory per operation."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = _rows(x)
        rows, dim = x.shape
        out = torch.empty(rows, dim, dtype=x.dtype)
        self._lib.bowline_rms_norm_f32(
            x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(), weight.data_ptr(),
            out.data_ptr(), rows, dim, float(eps), torch.get_num_threads(),
        )
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm(x, None, weight.contiguous(), eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not residual.is_contiguous() or residual.shape != x.shape:
            raise ValueError("the residual must be contiguous and shaped like x")
        return self._norm(x, residual, weight.contiguous(), eps)

    def _silu_mul(self, gate: int, gate_stride: int, up: int, up_stride: int, rows: int, dim: int) -> torch.Tensor:
        """The C call under both entry points: gate and up rows by data pointer and row stride (floats)."""
        out = torch.empty(rows, dim, dtype=torch.float32)
        self._lib.bowline_silu_mul_f32(gate, gate_stride, up, up_stride, out.data_ptr(), rows, dim, torch.get_num_threads())
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = _rows(gate), _rows(up)
        rows, dim = gate.shape
        return self._silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), rows, dim)

    def silu_mul_halves(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = _rows(gate_up)
        rows, width = gate_up.shape
        if width % 2:
            raise ValueError(f"a fused gate/up product has an even width, not {width}")
        dim, gate, stride = width // 2, gate_up.data_ptr(), gate_up.stride(0)
        return self._silu_mul(gate, stride, gate + dim * gate_up.element_size(), stride, rows, dim)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        rows, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim or x.dtype != torch.float32:
            raise ValueError("rotary needs float32 [T, heads, D] with contiguous heads")
        cos, sin = cos.contiguous(), sin.contiguous()
        self._lib.bowline_rotary_f32(
            x.data_ptr(), x.stride(0), rows, heads, head_dim, cos.data_ptr(), sin.data_ptr(), cos.shape[-1],
            torch.get_num_threads(),
        )


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(x, dim=-1) for 2-D float32 CPU rows, in one vectorised C pass per row (fused.c); None
    where the kernels are off or a row holds a NaN (torch's own argmax then gives its answer)."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    lib = load()
    if lib is None:
        return None
    x = _rows(x)
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64)
    lib.bowline_argmax_rows_f32(x.data_ptr(), x.stride(0), rows, n, out.data_ptr())
    return None if rows and bool((out < 0).any()) else out


def fused_ops() -> CpuFusedOps | None:
    """The C fused operations, or None where the kernels are off or do not build here."""
    lib = load()
    return None if lib is None else CpuFusedOps(lib)


def gemm_available() -> bool:
    """Whether the Linear kernel (kernels/gemm.c) was built here: kernels on, and an AVX-512 or AVX2 + FMA CPU."""
    lib = load()
    return lib is not None and hasattr(lib, "bowline_gemm_f32")


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 Linear weight [N, K] in gemm.c's panel layout (flat, about the same size)."""
    lib = load()
    if lib is None or not hasattr(lib, "bowline_gemm_f32"):
        raise RuntimeError("the CPU Linear kernel is not available")
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"expected a 2-D float32 weight, got {weight.dtype} {tuple(weight.shape)}")
    weight = weight.contiguous()
    n, k = weight.shape
    width = lib.bowline_gemm_panel_width()
    packed = torch.empty(-(-n // width) * k * width, dtype=torch.float32)
    lib.bowline_gemm_pack_f32(weight.data_ptr(), n, k, packed.data_ptr(), torch.get_num_threads())
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, K] (rows may be strided) @ weight^T + bias -> [M, out_features], from a packed weight."""
    return gemm_rows(_rows(x), packed.data_ptr(), pointer(bias), out_features)


def gemm_rows(x: torch.Tensor, weight: int, bias: int | None, out_features: int) -> torch.Tensor:
    """`linear` on rows already in the C loops' form (see `_rows`), the packed weight and bias as data
    pointers: what a layer that holds its pointers (KernelProduct) calls on each product."""
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        load().bowline_gemm_f32(
            x.data_ptr(), x.stride(0), weight, bias, out.data_ptr(), out_features, m, out_features, k,
            torch.get_num_threads(),
        )
    return out


def is_rows(x: torch.Tensor, width: int) -> bool:
    """Whether x is already what a C product reads ([M, width] float32, unit stride along each row).

    The decoder's activations always are; KernelProduct checks this first and skips the reshape, the
    _rows check and the view back, ~2 us of Python a call that a batch-1 step pays 30-odd times.
    """
    return x.dim() == 2 and x.shape[1] == width and x.dtype == torch.float32 and x.stride(1) == 1


class CLinear(NamedTuple):
    """A kernel Linear as kernels/decode_layers.c calls it: which C product, and its weight arguments."""

    kind: int  # one of the LINEAR_* numbers below (decode_layers.c's enum)
    group_size: int  # AWQ's input rows per scale; 0 otherwise
    weight: int
    scale: int | None  # int8: per column; AWQ: per group and column
    zero_scale: int | None  # AWQ: -zero * scale
    bias: int | None


LINEAR_F32, LINEAR_INT8, LINEAR_W8A8, LINEAR_AWQ, LINEAR_F16 = range(5)


class KernelProduct:
    """Mixin for a kernel Linear layer (an nn.Module with in_features and out_features): its forward,
    and its C call's weight arguments read once.

    Subclasses give `_product` (2-D float32 rows in the C loops' form -> [M, out_features]),
    `_weight_pointers` and `c_linear` (the same pointers for the one-call layer loop). Why the pointers
    are kept: a buffer read through nn.Module.__getattr__ and its data_ptr() cost ~1 us each; a layer
    with weight, scales, zeros and bias paid that on every call. The layers' buffers are set once in __init__ and never reassigned; `_apply` (what .to(), .float()
    and friends go through) can move them, so it forgets the pointers and the next call reads them again.
    """

    in_features: int
    out_features: int
    _bound: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_rows(x, self.in_features):  # the decoder's activations: straight to the C product
            return self._product(x)
        lead = x.shape[:-1]
        return self._product(_rows(x.reshape(-1, self.in_features))).view(*lead, self.out_features)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_pointers(self) -> tuple:
        """The call's weight arguments, in the C function's order (data pointers, None for no bias)."""
        raise NotImplementedError

    def c_linear(self) -> CLinear:
        """This layer for the whole-step C loop (kernels.decode_layers)."""
        raise NotImplementedError

    def weight_pointers(self) -> tuple:
        bound = self._bound
        if bound is None:
            bound = self._bound = self._weight_pointers()
        return bound

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def] - nn.Module's own signature
        self._bound = None
        return super()._apply(fn, recurse)  # type: ignore[misc]


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes, None (NULL) for an absent optional tensor."""
    return None if t is None else t.data_ptr()
