"""The packed decoder gives transformers' own logits, for every architecture it takes."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.async_engine import AsyncEngine
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.models import attention, loader, packed_decoder
from bowline_runtime.models.attention import AttentionMetadata, PrefillSpan, head_dim
from bowline_runtime.models.fused_ops import FusedOps
from bowline_runtime.models.packed_decoder import PackedDecoder


def _ops_variants():
    return [pytest.param(FusedOps, id="torch-ops"), pytest.param(kernels.fused_ops, id="c-ops")]


def _prefill_logits(model, ops, ids: torch.Tensor) -> torch.Tensor:
    """All positions' logits of one prompt, prefilled in one step through the paged cache."""
    config = model.config
    n = ids.shape[0]
    shape = (config.num_key_value_heads, 64, head_dim(config))
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), decode_groups=[], block_size=16, prefills=[PrefillSpan(0, n, n, None)],
        kv_caches=caches,
    )
    with torch.inference_mode():
        return PackedDecoder(model, ops)(ids, torch.arange(n), torch.arange(n), meta)


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids.unsqueeze(0)).logits[0]


@pytest.mark.parametrize("make_ops", _ops_variants())
@pytest.mark.parametrize("arch_fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_prefill_logits_match_transformers(request, arch_fixture, make_ops):
    from transformers import AutoModelForCausalLM

    ops = make_ops()
    if ops is None:
        pytest.skip("no C compiler: the C ops are not built here")
    path = request.getfixturevalue(arch_fixture)
    config = loader.load_config(str(path), False)
    ours = loader.load_model(str(path), config, torch.float32, "auto", False)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(300, config.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_prefill_logits(ours, ops, ids), _reference_logits(theirs, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make_ops", _ops_variants())
def test_qwen3_query_and_key_norms_are_applied(make_ops):
    """Qwen3 normalises each head's query and key; a config-built model checks that path."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    ops = make_ops()
    if ops is None:
        pytest.skip("no C compiler: the C ops are not built here")
    config = Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    for layer in theirs.model.layers:  # norms of ones would hide a missing norm
        layer.self_attn.q_norm.weight.data.normal_(1.0, 0.5)
        layer.self_attn.k_norm.weight.data.normal_(1.0, 0.5)
    attention.register()
    ours = AutoModelForCausalLM.from_config(  # a copy: from_config records the attention choice in the config
        copy.deepcopy(config), dtype=torch.float32, attn_implementation=attention.ATTN_IMPLEMENTATION
    )
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    assert packed_decoder.supports(ours)
    ids = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_prefill_logits(ours, ops, ids), _reference_logits(theirs, ids),
                               rtol=1e-4, atol=1e-4)


def test_other_architectures_keep_transformers_forward():
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not packed_decoder.supports(gpt2)
    gelu_llama = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        hidden_act="gelu",
    ))
    assert not packed_decoder.supports(gelu_llama)
    with pytest.raises(ValueError, match="not a plain Llama-family decoder"):
        PackedDecoder(gpt2, FusedOps())


def test_engine_uses_it_by_default_and_the_switch_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    prompts = [[300 + i for i in range(n)] for n in (5, 40, 90)]

    def tokens() -> tuple[bool, list[list[int]]]:
        engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))

        async def one(ids):
            ids_out: list[int] = []  # the engine streams deltas: each step's new tokens
            async for out in engine.generate(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)):
                ids_out.extend(out.outputs[0].new_token_ids)
            return ids_out

        async def batch():
            return await asyncio.gather(*(one(ids) for ids in prompts))

        try:
            return engine.engine.runner.decoder is not None, asyncio.run(batch())
        finally:
            asyncio.run(engine.shutdown())

    used, packed = tokens()
    assert used
    monkeypatch.setenv(packed_decoder.PACKED_DECODER_ENV, "0")
    used, plain = tokens()
    assert not used
    assert plain == packed


def test_projections_are_fused_once_and_only_plain_linear_layers(tiny_qwen2_dir, monkeypatch):
    """q/k/v and gate/up become one product each (Qwen2's biases included); layers a device has
    already swapped for its own kernels are left apart, and both forms give transformers' logits."""
    from bowline_runtime.devices.cpu import CpuDevice, KernelLinear, OneDnnLinear
    from transformers import AutoModelForCausalLM

    config = loader.load_config(str(tiny_qwen2_dir), False)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(300, config.vocab_size, (29,), generator=torch.Generator().manual_seed(3))
    expected = _reference_logits(theirs, ids)

    fused = loader.load_model(str(tiny_qwen2_dir), config, torch.float32, "auto", False)
    decoder = PackedDecoder(fused, FusedOps())
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    assert attn.qkv_proj.bias is not None and attn.qkv_proj.out_features == sum(attn.qkv_sizes)
    PackedDecoder(fused, FusedOps())  # a second decoder over the same model fuses nothing again
    assert attn.qkv_proj.out_features == sum(attn.qkv_sizes)
    torch.testing.assert_close(_prefill_logits(fused, decoder.ops, ids), expected, rtol=1e-4, atol=1e-4)

    monkeypatch.setenv("BOWLINE_CPU_LINEAR", "onednn")  # packed whatever measures fastest on tiny shapes
    packed_first = CpuDevice().optimize_model(loader.load_model(str(tiny_qwen2_dir), config, torch.float32, "auto", False))
    PackedDecoder(packed_first, FusedOps())
    attn = packed_first.model.layers[0].self_attn
    assert isinstance(attn.q_proj, (KernelLinear, OneDnnLinear)) and not hasattr(attn, "qkv_proj")
    torch.testing.assert_close(_prefill_logits(packed_first, FusedOps(), ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch_fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_bfloat16_prefill_follows_transformers(request, arch_fixture):
    """The torch reference ops in bfloat16: what a GPU or NPU runs (no C kernels), checked here on the CPU."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(arch_fixture)
    config = loader.load_config(str(path), False)
    ours = loader.load_model(str(path), config, torch.bfloat16, "auto", False)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(300, config.vocab_size, (33,), generator=torch.Generator().manual_seed(4))
    n = ids.shape[0]
    shape = (config.num_key_value_heads, 64, head_dim(config))
    caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
              for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), decode_groups=[], block_size=16, prefills=[PrefillSpan(0, n, n, None)],
        kv_caches=caches,
    )
    with torch.inference_mode():
        got = PackedDecoder(ours, FusedOps())(ids, torch.arange(n), torch.arange(n), meta).float()
    expected = _reference_logits(theirs, ids).float()
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.02 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
