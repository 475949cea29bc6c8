"""The C paged-attention kernels compute what torch attention over each sequence's gathered context computes,
built for this CPU and for AVX2 + FMA only (the kernel_isa fixture)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from bowline_runtime.devices.cpu import CpuDevice
from bowline_runtime.kernels import cpu as kernels

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the engine keeps its torch path"
)


def reference(q, k_cache, v_cache, tables, lens, scale, block_size):
    """Gather each context slot by slot and run torch's SDPA (grouped-query heads repeated)."""
    num_heads, n, _ = q.shape
    group = num_heads // k_cache.shape[0]
    out = []
    for i in range(n):
        pos = torch.arange(int(lens[i]))
        slots = tables[i][pos // block_size] * block_size + pos % block_size
        k = k_cache[:, slots].repeat_interleave(group, 0)
        v = v_cache[:, slots].repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[:, i : i + 1].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=scale)
        out.append(o[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    # head sizes 64 and 128 take the register path: on AVX-512 its query heads per key/value head in one
    # chunk (2), in several (8 at 128: 3 + 3 + 2; 7 at 64, as Qwen2.5-0.5B: 6 + 1); on AVX2 one head at a
    # time and, at 128, each row in two halves; the other head sizes take the loops
    [(8, 4, 64, 16), (4, 4, 32, 16), (8, 1, 128, 8), (6, 2, 80, 32), (14, 2, 64, 16), (4, 2, 128, 16)],
)
def test_kernel_matches_attention_over_gathered_contexts(kernel_isa, heads, kv_heads, head_dim, block_size):
    torch.manual_seed(heads * head_dim + block_size)
    num_blocks = 96
    k_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim)
    # one token, exactly one block, one past a block, and long ones; blocks scattered over the cache
    lens = torch.tensor([1, block_size, block_size + 1, 7 * block_size - 3, 10 * block_size])
    width = int(-(-lens.max() // block_size)) + 2  # tables are padded wider than any context needs
    tables = torch.randperm(num_blocks)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, head_dim).transpose(0, 1)  # [H, n, D], not contiguous, as in the model
    out = torch.full((len(lens), heads, head_dim), float("nan"))
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, block_size, out)
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens, head_dim**-0.5, block_size),
                               rtol=1e-4, atol=1e-5)


def test_kernel_writes_only_its_output_slice():
    """The runner hands the kernel a slice of the step's output rows: the rows around it stay untouched."""
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    tables = torch.tensor([[3, 1], [0, 2]])
    lens = torch.tensor([20, 9])
    q = torch.randn(4, 2, 16)
    out = torch.zeros(5, 4, 16)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, 16, out[1:3])
    assert out[0].abs().sum() == 0 and out[3:].abs().sum() == 0
    torch.testing.assert_close(out[1:3], reference(q, k_cache, v_cache, tables, lens, 0.25, 16), rtol=1e-4, atol=1e-5)


def test_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    first = kernels.build(compiler)
    built_at = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert kernels.build(compiler) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


def test_an_avx2_build_is_its_own_library_and_its_own_linear_timings(tmp_path, monkeypatch, kernel_isa):
    """A cached Linear choice measured with one build (or an older gemm.c) is never read for another."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    mine, signature = kernels.build(compiler), kernels.speed_signature()
    other = "native" if kernel_isa == "avx2" else "avx2"
    monkeypatch.setenv(kernels.ISA_ENV, other)
    assert kernels.speed_signature() != signature
    if other == "native" or "avx2" in kernels.cpu_signature().split():
        assert kernels.build(compiler) != mine


def test_an_unknown_isa_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "avx9")
    with pytest.raises(ValueError, match=kernels.ISA_ENV):
        kernels.compile_flags()


def test_cpu_device_offers_the_kernel_for_float32_only(monkeypatch):
    kernels.load.cache_clear()
    try:
        assert CpuDevice().paged_decode_kernel(torch.float32) is kernels.paged_decode_attention
        assert CpuDevice().paged_decode_kernel(torch.bfloat16) is None
        monkeypatch.setenv(kernels.KERNELS_ENV, "0")
        kernels.load.cache_clear()
        assert CpuDevice().paged_decode_kernel(torch.float32) is None
    finally:
        kernels.load.cache_clear()


def test_without_a_compiler_the_torch_path_stays(monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    kernels.load.cache_clear()
    try:
        assert kernels.load() is None
        assert "no C compiler" in caplog.text
    finally:
        kernels.load.cache_clear()


def test_a_failing_build_falls_back_with_the_compiler_message(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1: as a compiler that rejects the source would
    kernels.load.cache_clear()
    try:
        assert kernels.load() is None
        assert "could not be built" in caplog.text
        assert list(tmp_path.iterdir()) == []
    finally:
        kernels.load.cache_clear()


def prefill_reference(q, k_cache, v_cache, slots, scale):
    """SDPA over the gathered context with the chunk's causal mask (queries at the last n positions)."""
    n, ctx = q.shape[1], len(slots)
    rows = torch.arange(n).unsqueeze(1) + (ctx - n)
    allowed = torch.arange(ctx).unsqueeze(0) <= rows
    k, v = k_cache[:, slots].unsqueeze(0), v_cache[:, slots].unsqueeze(0)
    out = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 4, 64), (4, 4, 16), (14, 2, 64), (8, 1, 128)])
@pytest.mark.parametrize(
    ("ctx", "n"),
    [(1, 1), (15, 15), (64, 64), (65, 65), (200, 200), (200, 1), (300, 37), (700, 512)],  # whole prompts, then chunks
)
def test_prefill_kernel_matches_causal_attention_over_the_context(kernel_isa, heads, kv_heads, head_dim, ctx, n):
    torch.manual_seed(ctx * 31 + n + head_dim)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim)
    pos = torch.arange(ctx)
    table = torch.randperm(num_blocks)[: -(-ctx // block_size)]
    slots = table[pos // block_size] * block_size + pos % block_size
    q = torch.randn(n, heads, head_dim).transpose(0, 1)  # [H, n, D], not contiguous, as in the model
    out = torch.full((n, heads, head_dim), float("nan"))
    kernels.paged_prefill_attention(q, k_cache, v_cache, slots, head_dim**-0.5, out)
    torch.testing.assert_close(out, prefill_reference(q, k_cache, v_cache, slots, head_dim**-0.5), rtol=1e-4, atol=1e-5)


def test_prefill_kernel_is_offered_for_head_sizes_its_loops_step_through():
    kernels.load.cache_clear()
    try:
        assert CpuDevice().paged_prefill_kernel(torch.float32, 64) is kernels.paged_prefill_attention
        assert CpuDevice().paged_prefill_kernel(torch.float32, 72) is None  # not a multiple of 16
        assert CpuDevice().paged_prefill_kernel(torch.bfloat16, 64) is None
    finally:
        kernels.load.cache_clear()


# --kv-cache-dtype float16 / bfloat16: the kernels store keys and values rounded as torch's .to() rounds
# them and attend over exactly those values in float32.
HALF_KV = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("kv_dtype", HALF_KV)
def test_cache_writer_rounds_as_torch_does(kernel_isa, kv_dtype):
    torch.manual_seed(3)
    kv_heads, head_dim, slots_total = 2, 64, 48
    k = torch.randn(5, kv_heads * 3, head_dim)[:, :kv_heads].transpose(0, 1)  # [Hkv, T, D], strided rows
    v = torch.randn(5, kv_heads, head_dim).transpose(0, 1) * 1e3
    k_cache = torch.zeros(kv_heads, slots_total, head_dim, dtype=kv_dtype)
    v_cache = torch.zeros(kv_heads, slots_total, head_dim, dtype=kv_dtype)
    slots = torch.tensor([7, 0, 33, 47, 12])
    kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[:, slots], k.to(kv_dtype)) and torch.equal(v_cache[:, slots], v.to(kv_dtype))
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[:, untouched].abs().sum() == 0 and v_cache[:, untouched].abs().sum() == 0


@pytest.mark.parametrize("kv_dtype", HALF_KV)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 4, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80)])
def test_decode_kernel_reads_a_half_precision_cache(kernel_isa, kv_dtype, heads, kv_heads, head_dim):
    torch.manual_seed(heads + head_dim)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim).to(kv_dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim).to(kv_dtype)
    lens = torch.tensor([1, 16, 17, 109, 160])
    tables = torch.randperm(num_blocks)[: len(lens) * 12].view(len(lens), 12)
    q = torch.randn(len(lens), heads, head_dim).transpose(0, 1)
    out = torch.full((len(lens), heads, head_dim), float("nan"))
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, block_size, out)
    expected = reference(q, k_cache.float(), v_cache.float(), tables, lens, head_dim**-0.5, block_size)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", HALF_KV)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 4, 64), (4, 4, 16)])
@pytest.mark.parametrize(("ctx", "n"), [(65, 65), (300, 37)])
def test_prefill_kernel_reads_a_half_precision_cache(kernel_isa, kv_dtype, heads, kv_heads, head_dim, ctx, n):
    torch.manual_seed(ctx + n + head_dim)
    block_size, num_blocks = 16, 32
    k_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim).to(kv_dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim).to(kv_dtype)
    pos = torch.arange(ctx)
    table = torch.randperm(num_blocks)[: -(-ctx // block_size)]
    slots = table[pos // block_size] * block_size + pos % block_size
    q = torch.randn(n, heads, head_dim).transpose(0, 1)
    out = torch.full((n, heads, head_dim), float("nan"))
    kernels.paged_prefill_attention(q, k_cache, v_cache, slots, head_dim**-0.5, out)
    expected = prefill_reference(q, k_cache.float(), v_cache.float(), slots, head_dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_kernels_refuse_a_cache_of_another_dtype():
    q, out = torch.randn(2, 1, 16), torch.empty(1, 2, 16)
    cache = torch.zeros(1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.paged_decode_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([1]), 0.25, 16, out)
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.paged_decode_attention(q, cache.float(), cache.half(), torch.tensor([[0]]), torch.tensor([1]), 0.25,
                                       16, out)
