"""Speculative decoding's pure parts: settings from vLLM's flags and JSON, n-gram lookup, the rejection
rule's law, the draft budget, the block trim and the /metrics counters."""

from __future__ import annotations

import json

import pytest
import torch
from bowline_runtime.api.metrics import ServerMetrics
from bowline_runtime.config import EngineConfig, build_parser, config_from_args
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.outputs import EngineStats, SpecDecodeStats
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.sequence import Sequence
from bowline_runtime.engine.spec_decode import speculative_config_from
from bowline_runtime.engine.spec_decode.decoder import draft_budget
from bowline_runtime.engine.spec_decode.ngram import propose_ngram
from bowline_runtime.engine.spec_decode.rejection import acceptance_probability, residual_distribution, verify_sampled


def spec_of(argv: list[str], environ: dict | None = None):
    args = build_parser().parse_args(["--model", "m", *argv])
    return speculative_config_from(config_from_args(args, environ or {}))


def test_vllm_flags_and_json_and_env_give_the_same_settings():
    old = spec_of(["--speculative-model", "[ngram]", "--num-speculative-tokens", "4",
                   "--ngram-prompt-lookup-max", "3", "--ngram-prompt-lookup-min", "2"])
    new = spec_of(["--speculative-config", json.dumps(
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2})])
    env = spec_of([], {"BOWLINE_SPECULATIVE_MODEL": "[ngram]", "BOWLINE_NUM_SPECULATIVE_TOKENS": "4",
                       "BOWLINE_NGRAM_PROMPT_LOOKUP_MAX": "3", "BOWLINE_NGRAM_PROMPT_LOOKUP_MIN": "2"})
    assert old == new == env
    assert old.method == "ngram" and old.num_speculative_tokens == 4
    draft = spec_of(["--speculative-model", "/models/draft", "--num-speculative-tokens", "2",
                     "--speculative-disable-by-batch-size", "8"])
    assert (draft.method, draft.model, draft.disable_by_batch_size) == ("draft_model", "/models/draft", 8)
    assert spec_of([]) is None


@pytest.mark.parametrize("argv, words", [
    (["--speculative-model", "[ngram]"], "num-speculative-tokens"),
    (["--num-speculative-tokens", "3"], "without a method"),
    (["--speculative-config", "{bad"], "not valid JSON"),
    (["--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}'], "ngram' or 'draft_model"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}'], "unknown keys"),
    (["--speculative-model", "d", "--num-speculative-tokens", "0"], ">= 1"),
    (["--speculative-model", "d", "--num-speculative-tokens", "2",
      "--speculative-draft-tensor-parallel-size", "2"], r"draft-tensor-parallel-size.* 2 .*use 1 \(the draft unsharded"),
    (["--tensor-parallel-size", "2", "--speculative-model", "d", "--num-speculative-tokens", "2",
      "--speculative-draft-tensor-parallel-size", "3"], r"draft-tensor-parallel-size.* 3 .*use 1 .* or 2 "),
    (["--tensor-parallel-size", "2", "--speculative-config",
      '{"model": "d", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 3}'], r"draft_tensor_parallel_size.* or 2 "),
    (["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--speculative-model", "d",
      "--num-speculative-tokens", "2", "--speculative-draft-tensor-parallel-size", "2"], "--pipeline-parallel-size 2"),
])
def test_bad_speculative_settings_fail_at_start_up_naming_the_flag(argv, words):
    with pytest.raises(ValueError, match=words):
        spec_of(argv)


def test_draft_tensor_parallel_size_is_1_or_the_targets_and_ignored_for_ngram():
    """vLLM's rule: 1 (the draft whole beside rank 0, the default) or the target's size (sharded over its
    ranks); n-gram has no draft model, so vLLM (and Bowline) ignore the size there."""
    tp2 = ["--tensor-parallel-size", "2", "--num-speculative-tokens", "2"]
    assert not spec_of([*tp2, "--speculative-model", "d"]).sharded_draft
    assert not spec_of([*tp2, "--speculative-model", "d", "--speculative-draft-tensor-parallel-size", "1"]).sharded_draft
    sharded = spec_of([*tp2, "--speculative-model", "d", "--speculative-draft-tensor-parallel-size", "2"])
    assert sharded.sharded_draft and sharded.draft_tensor_parallel_size == 2
    as_json = spec_of(["--tensor-parallel-size", "2", "--speculative-config",
                       '{"model": "d", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}'])
    assert as_json == sharded
    ngram = spec_of([*tp2, "--speculative-model", "[ngram]", "--speculative-draft-tensor-parallel-size", "3"])
    assert ngram.method == "ngram" and not ngram.sharded_draft


def test_ngram_proposes_the_continuation_of_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_ngram(tokens, 3, n_max=3, n_min=1) == [7, 8, 5]  # latest match of [1, 2, 3]
    assert propose_ngram([4, 5, 6, 5], 2, n_max=3, n_min=1) == [6, 5]  # only the 1-gram [5] matches
    assert propose_ngram([1, 2, 3, 4], 2, n_max=3, n_min=1) == []
    assert propose_ngram([1, 2, 3, 4, 1], 2, n_max=3, n_min=2) == []  # a 1-gram is below the minimum


def test_rejection_rule_yields_the_target_law_for_any_proposal():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.1, 0.1, 0.7])
    draws = 20_000
    counts = torch.zeros(4)
    for _ in range(draws):
        proposal = int(torch.multinomial(q, 1, generator=gen))
        token, _ = verify_sampled(p, q, proposal, gen)
        counts[token] += 1
    assert float((counts / draws - p).abs().max()) < 0.015
    counts = torch.zeros(4)  # a deterministic proposal (n-gram lookup): always token 3, the unlikely one
    for _ in range(draws):
        token, _ = verify_sampled(p, None, 3, gen)
        counts[token] += 1
    assert float((counts / draws - p).abs().max()) < 0.015
    assert acceptance_probability(p, q, 0) == 1.0 and acceptance_probability(p, None, 1) == pytest.approx(0.3)
    assert residual_distribution(p, None, 0).tolist() == pytest.approx([0.0, 0.6, 0.3, 0.1])


def _seq(prompt: int, output: int, max_tokens: int | None) -> Sequence:
    seq = Sequence(0, "r", 0, list(range(prompt + output)), prompt, SamplingParams(max_tokens=max_tokens))
    return seq


def test_draft_budget_stops_short_of_max_tokens_max_model_len_and_the_block_table():
    seq = _seq(10, 2, max_tokens=5)
    seq.block_table = [0, 1]
    assert draft_budget(seq, 4, max_model_len=100, block_size=16) == 2  # 2 drafts + 1 bonus reach 5
    seq.params = SamplingParams()
    assert draft_budget(seq, 4, max_model_len=14, block_size=16) == 1
    assert draft_budget(seq, 30, max_model_len=1000, block_size=16) == 32 - 12  # slots the table holds


def test_trim_returns_the_blocks_past_the_tokens():
    manager = BlockManager(8, 4, enable_prefix_caching=True)
    seq = _seq(6, 0, None)
    manager.allocate(seq)
    manager.append_slots(seq, 5)  # lookahead: 11 tokens' room, 3 blocks
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 5
    manager.trim(seq)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 6
    manager.deallocate(seq)
    assert manager.num_free_blocks == 8


def test_metrics_expose_vllms_spec_decode_counters():
    stats = EngineStats(1, 0, 10, 20, SpecDecodeStats(7, 21, 12, [6, 4, 2]))
    text = ServerMetrics("m", lambda: stats).render().decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="m"} 7.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 21.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 12.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 4.0' in text
    plain = ServerMetrics("m", lambda: EngineStats(1, 0, 10, 20)).render().decode()
    assert "spec_decode" not in plain


def test_engine_config_refuses_bad_speculation_directly():
    with pytest.raises(ValueError, match="num-speculative-tokens"):
        EngineConfig(model="m", speculative_model="[ngram]")
