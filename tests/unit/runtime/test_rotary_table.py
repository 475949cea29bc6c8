"""The rotary table gives the rotary module's own cos/sin, bit for bit, for any positions, and calls the
module itself where the rope type re-derives its frequencies per call."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.models.rotary_table import RotaryTable, static_rope
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def _module(rope_parameters: dict) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         num_hidden_layers=1, vocab_size=100, max_position_embeddings=512,
                         rope_parameters={"rope_theta": 10000.0, **rope_parameters})
    return LlamaRotaryEmbedding(config)


def _expected(module: LlamaRotaryEmbedding, hidden: torch.Tensor, positions: torch.Tensor):
    cos, sin = module(hidden, positions.unsqueeze(0))
    return cos[0], sin[0]


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_equals_the_module_across_growth(rope, dtype):
    module = _module(rope)
    table = RotaryTable(module)
    assert table.static
    hidden = torch.zeros(3, 64, dtype=dtype)
    # unsorted positions of a packed batch; the second step reaches past the first table (256 rows)
    for positions in (torch.tensor([5, 0, 17]), torch.tensor([3, 700, 255]), torch.tensor([1, 2, 256])):
        cos, sin = table(hidden, positions)
        want_cos, want_sin = _expected(module, hidden, positions)
        assert cos.dtype == dtype and cos.shape == want_cos.shape
        assert torch.equal(cos, want_cos), (cos - want_cos).abs().max()
        assert torch.equal(sin, want_sin), (sin - want_sin).abs().max()


def test_the_table_is_computed_once_per_size():
    module = _module({"rope_type": "default"})
    table = RotaryTable(module)
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.zeros(1, 64)
    for position in (0, 10, 200, 3):
        table(hidden, torch.tensor([position]))
    assert len(calls) == 1  # the first 256 rows serve them all
    table(hidden, torch.tensor([300]))
    assert len(calls) == 2  # grown once, to 512 rows
    table(hidden, torch.tensor([511]))
    assert len(calls) == 2


def test_a_dynamic_rope_type_calls_the_module_every_step():
    module = _module({"rope_type": "dynamic", "factor": 2.0})
    assert not static_rope(module)
    table = RotaryTable(module)
    hidden = torch.zeros(2, 64)
    positions = torch.tensor([4, 900])  # past max_position_embeddings: dynamic scaling changes the frequencies
    cos, sin = table(hidden, positions)
    want_cos, want_sin = _expected(_module({"rope_type": "dynamic", "factor": 2.0}), hidden, positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
