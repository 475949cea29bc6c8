"""The one-call C layer loop (kernels.decode_layers) gives the Python layer loop's logits and KV cache on
every decode step, for float32 and quantized models, and is taken only where it computes the same thing."""

from __future__ import annotations

import copy

import pytest
import torch
from bowline_runtime.devices.cpu import CpuDevice
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.kernels.decode_layers import DECODE_LAYERS_ENV, DecodeLayers
from bowline_runtime.models import loader
from bowline_runtime.models.attention import AttentionMetadata, DecodeGroup, PrefillSpan, head_dim
from bowline_runtime.models.packed_decoder import PackedDecoder

pytestmark = pytest.mark.skipif(not kernels.gemm_available(), reason="needs the C kernels with gemm.c "
                                "(a C compiler and an AVX-512 or AVX2 + FMA CPU)")

BLOCK = 16
PROMPT_LENS = (5, 16, 33)  # within a block, exactly one block, past two
STEPS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tiny_qwen2_dir):
    from bowline_runtime.tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("decode-layers")
    return {
        "float32": (tiny_model_dir, "auto"), "qwen2-bias": (tiny_qwen2_dir, "auto"), "int8": (tiny_model_dir, "int8"),
        "awq": (build_tiny_model(root / "awq", quantization="awq"), "auto"),
        "w8a8": (build_tiny_model(root / "w8a8", quantization="w8a8"), "auto"),
    }


def _decoder(path, quantization: str = "auto") -> PackedDecoder:
    """The decoder as the engine builds it on the CPU: fused, kernels swapped in, then the C loop."""
    config = loader.load_config(str(path), False)
    model = loader.load_model(str(path), config, torch.float32, "auto", False, quantization=quantization)
    device = CpuDevice()
    decoder = PackedDecoder(model, device.fused_ops(torch.float32))
    device.optimize_model(model)
    decoder.decode_layers = device.decode_layers(decoder)
    return decoder


def _meta(caches, slots, decode_groups=(), prefills=()) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), decode_groups=list(decode_groups), block_size=BLOCK,
        prefills=list(prefills), kv_caches=caches, decode_kernel=kernels.paged_decode_attention,
        prefill_kernel=kernels.paged_prefill_attention, cache_writer=kernels.write_kv_cache,
    )


def _decode_group(tables: list[list[int]], lens: list[int]) -> DecodeGroup:
    width = max(len(t) for t in tables)
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return DecodeGroup(0, len(lens), blocks, torch.tensor(lens), None, {}, False, 0)


class Sequences:
    """A few sequences in a paged cache: each prefilled alone, then decoding together greedily."""

    def __init__(self, decoder: PackedDecoder, kv_dtype: torch.dtype = torch.float32) -> None:
        config = decoder.model.config
        blocks_each = -(-(max(PROMPT_LENS) + STEPS) // BLOCK)
        shape = (config.num_key_value_heads, BLOCK * blocks_each * len(PROMPT_LENS) + BLOCK, head_dim(config))
        self.caches = [(torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
                       for _ in range(config.num_hidden_layers)]
        # Blocks handed out backwards, so no table is the identity.
        free = list(range(shape[1] // BLOCK - 1, 0, -1))
        self.tables = [[free.pop(0) for _ in range(blocks_each)] for _ in PROMPT_LENS]
        self.lens = [0] * len(PROMPT_LENS)
        self.last: list[int] = []
        gen = torch.Generator().manual_seed(7)
        with torch.inference_mode():
            for i, n in enumerate(PROMPT_LENS):
                ids = torch.randint(300, 2000, (n,), generator=gen)
                slots = [self._slot(i, p) for p in range(n)]
                ctx = torch.tensor(slots)
                logits = decoder(ids, torch.arange(n), torch.tensor([n - 1]),
                                 _meta(self.caches, slots, prefills=[PrefillSpan(0, n, n, ctx)]))
                self.lens[i] = n
                self.last.append(int(logits[0].argmax()))

    def _slot(self, seq: int, pos: int) -> int:
        return self.tables[seq][pos // BLOCK] * BLOCK + pos % BLOCK

    def decode_step(self, decoder: PackedDecoder, caches) -> tuple[torch.Tensor, AttentionMetadata]:
        """One decode step of every sequence over `caches` (the cache state is this object's lens)."""
        n = len(self.lens)
        positions = list(self.lens)
        slots = [self._slot(i, p) for i, p in enumerate(positions)]
        group = _decode_group([t[: -(-(p + 1) // BLOCK)] for t, p in zip(self.tables, positions, strict=True)],
                              [p + 1 for p in positions])
        meta = _meta(caches, slots, decode_groups=[group])
        with torch.inference_mode():
            logits = decoder(torch.tensor(self.last), torch.tensor(positions), torch.arange(n), meta)
        return logits, meta

    def both_loops_step(self, decoder: PackedDecoder, fast) -> torch.Tensor:
        """One decode step through the Python loop (on a copy of the cache) and through `fast` (on the cache):
        asserts the two give the same logits and leave the same cache; returns the Python loop's logits."""
        python_caches = copy.deepcopy(self.caches)
        decoder.decode_layers = None
        want, _ = self.decode_step(decoder, python_caches)
        decoder.decode_layers = fast
        got, _ = self.decode_step(decoder, self.caches)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for (k, v), (pk, pv) in zip(self.caches, python_caches, strict=True):
            assert torch.equal(k, pk) and torch.equal(v, pv)
        return want

    def advance(self, logits: torch.Tensor) -> None:
        self.lens = [n + 1 for n in self.lens]
        self.last = [int(t) for t in logits.argmax(-1)]


class Counting:
    """The decoder's C loop, counting the steps it ran."""

    def __init__(self, inner: DecodeLayers) -> None:
        self.inner, self.calls = inner, 0

    def accepts(self, meta: AttentionMetadata, tokens: int) -> bool:
        return self.inner.accepts(meta, tokens)

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


@pytest.mark.parametrize("name", ["float32", "qwen2-bias", "int8", "awq", "w8a8"])
def test_c_loop_gives_the_python_loops_logits_and_cache(models, name):
    path, quantization = models[name]
    decoder = _decoder(path, quantization)
    assert isinstance(decoder.decode_layers, DecodeLayers), "every layer product is a C kernel: the C loop is taken"
    fast = Counting(decoder.decode_layers)
    seqs = Sequences(decoder)
    for _ in range(STEPS):
        seqs.advance(seqs.both_loops_step(decoder, fast))
    assert fast.calls == STEPS


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_c_loop_reads_and_writes_a_half_precision_cache_as_the_python_loop_does(models, kv_dtype):
    decoder = _decoder(models["float32"][0])
    fast = Counting(decoder.decode_layers)
    seqs = Sequences(decoder, kv_dtype)
    for _ in range(STEPS):
        seqs.advance(seqs.both_loops_step(decoder, fast))
    assert fast.calls == STEPS
    assert seqs.caches[0][0].dtype == kv_dtype and seqs.caches[0][0].abs().sum() > 0


def test_a_new_cache_is_bound_again(models):
    """The layer structs point into the KV cache; a new one (the engine reallocating it) must be followed."""
    decoder = _decoder(models["float32"][0])
    seqs = Sequences(decoder)
    seqs.decode_step(decoder, copy.deepcopy(seqs.caches))  # the C loop bound to another cache first
    seqs.both_loops_step(decoder, decoder.decode_layers)


def test_steps_it_does_not_compute_keep_the_python_loop(models):
    decoder = _decoder(models["float32"][0])
    fast = decoder.decode_layers
    assert fast is not None
    caches = Sequences(decoder).caches
    one = _decode_group([[1]], [3])
    assert fast.accepts(_meta(caches, [2], decode_groups=[one]), 1)
    assert not fast.accepts(_meta(caches, [2, 40], decode_groups=[one], prefills=[PrefillSpan(1, 2, 1, None)]), 2)
    two = [DecodeGroup(0, 1, one.blocks, one.lens, None, {}, False, 0),
           DecodeGroup(1, 2, one.blocks, one.lens, None, {}, False, 0)]
    assert not fast.accepts(_meta(caches, [2, 3], decode_groups=two), 2)
    torch_attention = _meta(caches, [2], decode_groups=[one])
    torch_attention.decode_kernel = None
    assert not fast.accepts(torch_attention, 1)


def test_models_it_cannot_serve_get_no_c_loop(models, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen3Config

    monkeypatch.setenv(DECODE_LAYERS_ENV, "0")
    assert _decoder(models["float32"][0]).decode_layers is None
    monkeypatch.delenv(DECODE_LAYERS_ENV)
    monkeypatch.setenv("BOWLINE_CPU_LINEAR", "torch")  # plain nn.Linear products: not C kernels
    assert _decoder(models["float32"][0]).decode_layers is None
    monkeypatch.delenv("BOWLINE_CPU_LINEAR")
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(  # per-head q/k norms: the Python loop's job
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    ))
    decoder = PackedDecoder(qwen3, CpuDevice().fused_ops(torch.float32))
    CpuDevice().optimize_model(qwen3)
    assert DecodeLayers.of(decoder) is None


def test_layer_products_take_the_c_kernel_unmeasured(models, monkeypatch):
    """The C loop needs every layer product to be a C kernel: they take it without a measurement, which
    could pick oneDNN or torch for a shape by a few microseconds (the loop saves ~1 ms a step)."""
    from bowline_runtime.devices import cpu as cpu_device

    measured: list[tuple[int, int]] = []
    real = cpu_device.LinearChooser._measured

    def spy(self, linear, available):
        measured.append((linear.out_features, linear.in_features))
        return real(self, linear, available)

    monkeypatch.setattr(cpu_device.LinearChooser, "_measured", spy)
    decoder = _decoder(models["float32"][0])
    layer = decoder.layers[0]
    for product in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(product, cpu_device.KernelLinear)
    config = decoder.model.config
    assert measured == [(config.vocab_size, config.hidden_size)]  # the LM head alone is measured
