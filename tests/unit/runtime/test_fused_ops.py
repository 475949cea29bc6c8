"""The C fused operations compute what the torch reference (transformers' arithmetic) computes."""

from __future__ import annotations

import shutil

import pytest
import torch
from bowline_runtime.devices.cpu import CpuDevice
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.models.fused_ops import FusedOps
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the engine keeps its torch ops"
)

REF = FusedOps()
# Rows per call: a decode step's few (one thread) and a prefill chunk's many (split over threads).
ROWS = [1, 5, 300]


@pytest.fixture
def ops(kernel_isa):
    """The C ops of this CPU's build and of an AVX2 + FMA only build (kernel_isa)."""
    c_ops = kernels.fused_ops()
    assert c_ops is not None, f"a C compiler is here: the {kernel_isa} kernels must build"
    return c_ops


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [16, 64, 896])
def test_rms_norm_matches_transformers(ops, rows, dim):
    torch.manual_seed(rows + dim)
    norm = LlamaRMSNorm(dim, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(rows, dim) * 3
    with torch.inference_mode():
        expected = norm(x)
    torch.testing.assert_close(REF.rms_norm(x, norm.weight, 1e-5), expected)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight.detach(), 1e-5), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_updates_the_stream_and_normalises_it(ops, rows):
    torch.manual_seed(rows)
    dim = 512
    x, stream, weight = torch.randn(rows, dim), torch.randn(rows, dim), torch.randn(dim)
    ref_stream, c_stream = stream.clone(), stream.clone()
    expected = REF.add_rms_norm(x, ref_stream, weight, 1e-6)
    got = ops.add_rms_norm(x, c_stream, weight, 1e-6)
    torch.testing.assert_close(ref_stream, stream + x)
    torch.testing.assert_close(c_stream, ref_stream)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_norm_reads_strided_rows(ops):
    """q/k per-head norms (Qwen3) and sliced inputs arrive with a row stride wider than the row."""
    wide = torch.randn(7, 96)
    x = wide[:, 16:80]
    weight = torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), REF.rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_matches_torch_on_strided_halves(ops, rows):
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536) * 4  # one fused product, read as two strided halves
    gate, up = gate_up[:, :1536], gate_up[:, 1536:]
    torch.testing.assert_close(ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [1536, 24])
def test_silu_mul_of_a_fused_products_halves(ops, rows, dim):
    torch.manual_seed(rows + dim)
    gate_up = torch.randn(rows, 2 * dim) * 4
    want = torch.nn.functional.silu(gate_up[:, :dim]) * gate_up[:, dim:]
    for impl in (ops, REF):
        torch.testing.assert_close(impl.silu_mul_halves(gate_up), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even width"):
        ops.silu_mul_halves(gate_up[:, 1:])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("heads", "head_dim"), [(8, 64), (2, 16), (14, 128)])
def test_rotary_matches_transformers_in_place(ops, rows, heads, head_dim):
    torch.manual_seed(rows * heads)
    positions = torch.randint(0, 4096, (rows,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = torch.randn(rows, heads, head_dim)
    expected, _ = apply_rotary_pos_emb(q.transpose(0, 1), q.transpose(0, 1), cos, sin, unsqueeze_dim=0)
    expected = expected.transpose(0, 1)
    ref, got = q.clone(), q.clone()
    REF.rotary(ref, cos, sin)
    ops.rotary(got, cos, sin)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rotary_leaves_dimensions_past_a_partial_rotary_alone(ops):
    rows, heads, head_dim, rot = 9, 4, 64, 32
    q = torch.randn(rows, heads, head_dim)
    angles = torch.rand(rows, rot // 2) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    ref, got = q.clone(), q.clone()
    REF.rotary(ref, cos, sin)
    ops.rotary(got, cos, sin)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., rot:], q[..., rot:])
    assert not torch.allclose(got[..., :rot], q[..., :rot])


def test_cpu_device_offers_the_c_ops_for_float32_only():
    device = CpuDevice()
    assert isinstance(device.fused_ops(torch.float32), kernels.CpuFusedOps)
    assert type(device.fused_ops(torch.bfloat16)) is FusedOps


def test_without_kernels_the_cpu_keeps_the_torch_ops(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    kernels.load.cache_clear()
    try:
        assert type(CpuDevice().fused_ops(torch.float32)) is FusedOps
    finally:
        kernels.load.cache_clear()


@pytest.mark.parametrize("tokens", [1, 16, 700])
def test_cache_write_puts_each_tokens_keys_and_values_in_its_slot_only(kernel_isa, tokens):
    torch.manual_seed(tokens)
    kv_heads, head_dim, num_slots = 4, 64, 2048
    qkv = torch.randn(tokens, (8 + 2 * kv_heads) * head_dim)  # one product; k and v are strided views of it
    _, k, v = qkv.split([8 * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k = k.view(tokens, kv_heads, head_dim).transpose(0, 1)  # [Hkv, T, D], as attention receives them
    v = v.view(tokens, kv_heads, head_dim).transpose(0, 1)
    slots = torch.randperm(num_slots)[:tokens]
    expected_k, expected_v = torch.randn(kv_heads, num_slots, head_dim), torch.randn(kv_heads, num_slots, head_dim)
    got_k, got_v = expected_k.clone(), expected_v.clone()
    expected_k.index_copy_(1, slots, k)
    expected_v.index_copy_(1, slots, v)
    kernels.write_kv_cache(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
    contiguous_k, contiguous_v = got_k.clone(), got_v.clone()
    kernels.write_kv_cache(k.contiguous(), v.contiguous(), contiguous_k, contiguous_v, slots)
    assert torch.equal(contiguous_k, expected_k) and torch.equal(contiguous_v, expected_v)


def test_cpu_device_writes_the_cache_in_c_for_float32_only():
    assert CpuDevice().paged_cache_writer(torch.float32) is kernels.write_kv_cache
    assert CpuDevice().paged_cache_writer(torch.bfloat16) is None
