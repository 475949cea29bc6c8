"""Quantized weights: AWQ's nibble order against an unpacking written here, the CPU kernels against the
layers' torch arithmetic (native build and an AVX2-only build), and bad checkpoints refused by name."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.kernels import quant_cpu
from bowline_runtime.models import loader
from bowline_runtime.models import quantization as Q
from bowline_runtime.models.quant_linear import AwqLinear, HalfLinear, Int8Linear
from bowline_runtime.tools.tiny_model import build_tiny_model

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="no C compiler: the quantized kernels are not built")

# Column j of each 8-column word sits in this nibble (AutoAWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7).
NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]


def independent_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 words -> int values, one element at a time (no shared code with the runtime)."""
    rows, words = packed.shape
    out = torch.empty(rows, words * 8, dtype=torch.int64)
    as_unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    for c in range(words):
        for j in range(8):
            out[:, 8 * c + j] = (as_unsigned[:, c] >> (4 * NIBBLE_OF_COLUMN[j])) & 0xF
    return out


def test_awq_word_for_known_columns():
    # columns 0..7 hold 1..8: nibbles 0..7 hold columns 0, 2, 4, 6, 1, 3, 5, 7 -> 1, 3, 5, 7, 2, 4, 6, 8
    word = Q.pack_awq(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert word.dtype == torch.int32 and int(word) & 0xFFFFFFFF == 0x86427531
    assert independent_unpack(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_awq_layer_dequantizes_as_an_independent_unpacking():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    qweight, qzeros, scales = Q.quantize_awq(weight, 32)
    q, z = independent_unpack(qweight).float(), independent_unpack(qzeros).float()
    s = scales.float()
    expected = ((q - z.repeat_interleave(32, 0)) * s.repeat_interleave(32, 0)).t()
    layer = AwqLinear(qweight, qzeros, scales, 32)
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), expected, rtol=0, atol=0)
    # and it is the float weight to within half a quantization step
    assert ((expected - weight).abs() <= s.repeat_interleave(32, 0).t() * 0.5 + 1e-6).all()
    # a wrong nibble order (plain 0..7) would give another weight: the check above can fail
    plain = torch.stack([(qweight.to(torch.int64) & 0xFFFFFFFF) >> (4 * n) & 0xF for n in range(8)], -1)
    assert not torch.equal(plain.reshape(64, 48).float(), q)


def _avx2_library(tmp_path: Path, f16c: bool = False) -> ctypes.CDLL | None:
    """quant_gemm.c (with the gemm.c it calls for many rows) built for AVX2 + FMA only, as on a CPU
    without AVX-512; `f16c` adds the half-precision conversion instructions (every AVX2 CPU has them,
    without them the float16 weights take the portable conversion)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    sources = [str(Path(kernels.__file__).with_name(name)) for name in ("quant_gemm.c", "gemm.c")]
    target = tmp_path / "quant_avx2.so"
    objects = []
    for source in sources:  # compiled with -ffast-math, linked without (as kernels.cpu builds): no process-wide FTZ
        objects.append(str(tmp_path / (Path(source).stem + ".o")))
        subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-mno-avx512f", *(["-mf16c"] if f16c else []),
                        "-ffast-math", "-fopenmp", "-fPIC", "-c", source, "-o", objects[-1]],
                       check=True, capture_output=True)
    subprocess.run([compiler, "-shared", "-fopenmp", *objects, "-o", str(target), "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(target))
    native = kernels.load()
    for name in ("bowline_q8_gemm_f32", "bowline_q4_gemm_f32", "bowline_f16_gemm_f32", "bowline_quantize_rows_f32"):
        getattr(lib, name).argtypes = getattr(native, name).argtypes
        getattr(lib, name).restype = None
    return lib


@needs_kernels
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_cpu_kernels_compute_the_layers_arithmetic(build, tmp_path):
    lib = kernels.load() if build == "native" else _avx2_library(tmp_path)
    torch.manual_seed(1)
    for n, k, group in [(40, 64, 32), (200, 256, 128), (24, 96, 32)]:
        w, bias = torch.randn(n, k), torch.randn(n)
        layers = [AwqLinear(*Q.quantize_awq(w, group), group, bias=bias), Int8Linear(*Q.quantize_int8(w), bias=bias),
                  Int8Linear(*Q.quantize_int8(w), act_quant=True)]
        for layer in layers:
            fast = quant_cpu.AwqKernelLinear(layer) if isinstance(layer, AwqLinear) else quant_cpu.Int8KernelLinear(layer)
            fast._lib = lib
            for rows in (1, 2, 3, 5, 6, 8, 15, 16, 37, 64):  # blocks up to 6 rows; dequantized panels from 16 (VNNI: 64)
                x = torch.randn(rows, k)
                torch.testing.assert_close(fast(x), layer(x), rtol=1e-4, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_4bit_products_of_one_row_match_the_layer(build, tmp_path):
    """One row: the integer paths (AVX2's vpmaddubsw, VNNI's vpdpbusd) split x into int8 pieces, group by
    group over the threads; the result stays within float32 rounding of the layer's at any scale of x, a
    last panel of 8 columns included, and an inf in x (which pieces cannot carry) takes the float path."""
    lib = kernels.load() if build == "native" else _avx2_library(tmp_path)
    torch.manual_seed(3)
    for n, k, group in [(2056, 256, 128), (4096, 384, 64), (40, 1536, 128)]:
        w, bias = torch.randn(n, k), torch.randn(n)
        layer = AwqLinear(*Q.quantize_awq(w, group), group, bias=bias)
        fast = quant_cpu.AwqKernelLinear(layer)
        fast._lib = lib
        for scale in (1.0, 1e-3, 1e3):
            x = torch.randn(1, k) * scale
            torch.testing.assert_close(fast(x), layer(x), rtol=1e-4, atol=1e-3 * scale)
        x = torch.randn(1, k)
        x[0, 5] = float("inf")  # int8 pieces would turn it into a finite number; every output must stay non-finite
        assert not torch.isfinite(fast(x)).any() and not torch.isfinite(layer(x)).any()


@needs_kernels
@pytest.mark.parametrize("build", ["native", "avx2-f16c", "avx2"])
def test_float16_weights_are_widened_exactly(build, tmp_path):
    """The float16 LM head's kernel computes the float32 product of the exactly widened weights (largest
    half, subnormals and signed zero included); the AVX2 build without F16C checks the portable conversion."""
    lib = kernels.load() if build == "native" else _avx2_library(tmp_path, f16c=build == "avx2-f16c")
    torch.manual_seed(5)
    for n, k in [(40, 64), (200, 256), (17, 24)]:
        w = (torch.randn(n, k) * 0.1).half()
        w[0, :4] = torch.tensor([65504.0, -0.0, 6e-8, -3e-6]).half()  # max, -0, subnormals
        bias = torch.randn(n) if n == 40 else None
        fast = quant_cpu.HalfKernelLinear(HalfLinear(w, bias))
        fast._lib = lib
        for rows in (1, 2, 3, 5, 6, 8, 15, 16, 37):  # register blocks below 16 rows, a widened panel from 16
            x = torch.randn(rows, k)
            exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            torch.testing.assert_close(fast(x).double(), exact, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_cpu_kernel_reads_strided_rows():
    layer = AwqLinear(*Q.quantize_awq(torch.randn(64, 64), 32), 32)
    x = torch.randn(5, 100)[:, 10:74]
    torch.testing.assert_close(quant_cpu.AwqKernelLinear(layer)(x), layer(x), rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-awq", quantization="awq")


def _broken_copy(src: Path, dst: Path, config_edit=None, drop: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_edit:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    if drop:
        tensors = load_file(str(dst / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _load(path: Path, quantization: str = "auto"):
    config = loader.load_config(str(path), False)
    return loader.load_model(str(path), config, torch.float32, "auto", False, quantization=quantization)


@pytest.mark.parametrize(("edit", "drop", "message"), [
    (lambda qc: qc.update(bits=8), None, "quantization_config.bits is 8"),
    (None, "model.layers.1.mlp.down_proj.scales", "no tensor model.layers.1.mlp.down_proj.scales"),
    (lambda qc: qc.update(group_size=48), None,
     "model.layers.0.self_attn.q_proj.qweight: in_features 64 is not a multiple of the AWQ group_size 48"),
], ids=["bits-8", "missing-scales", "group-size"])
def test_bad_awq_checkpoints_are_refused_naming_the_tensor(awq_dir, tmp_path, edit, drop, message):
    broken = _broken_copy(awq_dir, tmp_path / "broken", edit, drop)
    with pytest.raises(Q.QuantizationError, match=message.replace(".", r"\.")):
        _load(broken)


def test_the_flag_must_match_the_checkpoint(awq_dir, tiny_model_dir):
    with pytest.raises(Q.QuantizationError, match="needs a awq checkpoint.*float weights"):
        _load(tiny_model_dir, "awq")
    with pytest.raises(Q.QuantizationError, match="needs a w8a8 checkpoint.*a awq checkpoint"):
        _load(awq_dir, "smoothquant")
    with pytest.raises(Q.QuantizationError, match="already awq"):
        _load(awq_dir, "int8")
    model = _load(awq_dir, "awq")
    assert isinstance(model.model.layers[0].mlp.down_proj, AwqLinear)


def test_a_float16_head_stays_float16_under_a_float32_model(awq_dir):
    """AutoAWQ saves the unquantized layers in float16 (the tiny builder too): a float32 model keeps the
    head's half-precision weight as it is, bit for bit; a half-precision model keeps a plain Linear."""
    from safetensors.torch import load_file

    saved = load_file(str(awq_dir / "model.safetensors"))
    assert {saved[k].dtype for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")} == {
        torch.float16}
    head = _load(awq_dir).lm_head
    assert isinstance(head, HalfLinear) and head.weight.dtype == torch.float16
    assert torch.equal(head.weight, saved["lm_head.weight"])
    config = loader.load_config(str(awq_dir), False)
    half = loader.load_model(str(awq_dir), config, torch.bfloat16, "auto", False, quantization="awq")
    assert type(half.lm_head) is torch.nn.Linear and half.lm_head.weight.dtype == torch.bfloat16


def test_tensor_parallel_refuses_a_size_that_splits_a_group():
    layer = AwqLinear(*Q.quantize_awq(torch.randn(16, 128), 64), 64)
    assert layer.shard_rows(1, 2, "x").in_features == 64
    with pytest.raises(Q.QuantizationError, match=r"splits the quantization groups of model\.l\.down_proj\.qweight"):
        layer.shard_rows(0, 4, "model.l.down_proj")
    with pytest.raises(Q.QuantizationError, match="whole int32 words"):
        layer.shard_columns(0, 4, "model.l.up_proj")  # 4 columns per rank: half a word


def test_shards_compute_the_whole_layer():
    torch.manual_seed(2)
    layer = AwqLinear(*Q.quantize_awq(torch.randn(32, 128), 32), 32, bias=torch.randn(32))
    x = torch.randn(3, 128)
    cols = torch.cat([layer.shard_columns(r, 2, "x")(x) for r in range(2)], -1)
    rows = sum(layer.shard_rows(r, 2, "x")(x[:, 64 * r : 64 * (r + 1)]) for r in range(2)) + layer.bias
    torch.testing.assert_close(cols, layer(x))
    torch.testing.assert_close(rows, layer(x), rtol=1e-5, atol=1e-5)


def test_int8_shards_compute_the_whole_layer():
    torch.manual_seed(4)
    layer = Int8Linear(*Q.quantize_int8(torch.randn(32, 64)), bias=torch.randn(32))
    x = torch.randn(3, 64)
    cols = torch.cat([layer.shard_columns(r, 2, "x")(x) for r in range(2)], -1)
    rows = sum(layer.shard_rows(r, 2, "x")(x[:, 32 * r : 32 * (r + 1)]) for r in range(2)) + layer.bias
    torch.testing.assert_close(cols, layer(x))
    torch.testing.assert_close(rows, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_quant", [False, True])
def test_half_precision_cpu_layers_are_dequantized_once_with_the_same_numbers(act_quant):
    layer = Int8Linear(*Q.quantize_int8(torch.randn(24, 64)), act_quant=act_quant)
    cpu_layer = quant_cpu.kernel_layer(layer, torch.bfloat16)
    assert not any(b.dtype == torch.int8 for b in cpu_layer.buffers())  # floats, made once
    x = torch.randn(2, 64)
    torch.testing.assert_close(cpu_layer(x.bfloat16()).float(), layer(x), rtol=0.05, atol=0.1)
    awq = AwqLinear(*Q.quantize_awq(torch.randn(24, 64), 32), 32)
    torch.testing.assert_close(quant_cpu.kernel_layer(awq, torch.bfloat16)(x.bfloat16()).float(), awq(x),
                               rtol=0.05, atol=0.1)


@needs_kernels
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_c_activation_rounding_is_torchs(build, tmp_path):
    lib = kernels.load() if build == "native" else _avx2_library(tmp_path)
    torch.manual_seed(5)
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.0]])  # scale 1: exact halves, to even
    for x in (torch.randn(9, 300) * 4, ties, torch.zeros(2, 16)):
        out = torch.empty_like(x)
        lib.bowline_quantize_rows_f32(x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0], x.shape[1])
        assert torch.equal(out, Q.quantize_activations(x))
