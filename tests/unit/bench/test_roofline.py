"""The roofline's arithmetic, its weight counting, and one short CPU run end to end (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import roofline
from bench.roofline import WeightCount


def _qwen2_on_meta(tied: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_untied_decode_reads_all_but_the_input_embedding():
    assert roofline.decode_weight_bytes(WeightCount(total_bytes=1000, input_embedding_bytes=300, tied=False)) == 700


def test_tied_head_is_the_embedding_table_read_once():
    assert roofline.decode_weight_bytes(WeightCount(total_bytes=1000, input_embedding_bytes=300, tied=True)) == 1000


def test_count_weights_sees_a_tied_head_once():
    tied, untied = roofline.count_weights(_qwen2_on_meta(True)), roofline.count_weights(_qwen2_on_meta(False))
    embedding = 100 * 16 * 2  # vocab x hidden, bfloat16
    assert tied.tied and not untied.tied
    assert tied.input_embedding_bytes == untied.input_embedding_bytes == embedding
    assert untied.total_bytes == tied.total_bytes + embedding
    # Either way a decode step streams one vocab x hidden head plus the layers.
    assert roofline.decode_weight_bytes(tied) == roofline.decode_weight_bytes(untied)


def test_model_weight_count_of_a_real_size_config_needs_no_weights(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path)
    count = roofline.model_weight_count(str(tmp_path), torch.bfloat16)
    assert count.tied
    assert count.total_bytes == 494_032_768 * 2  # Qwen2.5-0.5B's parameter count, bfloat16


def test_bandwidth_limit_and_fraction():
    assert roofline.copy_bandwidth(2**30, 1.0) == 2 * 2**30  # read + write
    assert roofline.bandwidth_limit_s(500, 1000.0) == 0.5
    assert roofline.roofline_fraction(limit_s=0.5, measured_s=2.0) == 0.25


def test_decode_step_times_drop_the_prefill_and_warm_up_steps():
    assert roofline.decode_step_times([9.0, 5.0, 1.0, 2.0, 3.0], skip=1) == [1.0, 2.0, 3.0]


def test_summarize_uses_the_fastest_copy_and_the_median_step():
    s = roofline.summarize(WeightCount(400, 100, False), copy_bytes=100, copy_times=[2.0, 1.0, 4.0],
                           steps=[3.0, 1.0, 2.0])
    assert s["weight_bytes_per_step"] == 300
    assert s["copy_bandwidth_bytes_per_s"] == 200.0
    assert s["copy_bandwidth_median_bytes_per_s"] == 100.0
    assert s["step_time_s"] == 2.0
    assert s["limit_s"] == 1.5
    assert s["fraction"] == 0.75


def test_too_few_output_tokens_are_refused():
    with pytest.raises(SystemExit):
        roofline.parse_args(["--output-tokens", "3", "--skip-steps", "2"])


@pytest.mark.slow
def test_cpu_run_writes_positive_figures(tiny_model_dir, tmp_path, capsys):
    rc = roofline.main([
        "--model-preset", "tiny", "--model-dir", str(tiny_model_dir), "--output-tokens", "8", "--warmup-tokens", "4",
        "--skip-steps", "2", "--copy-mib", "8", "--repeats", "2", "--results-dir", str(tmp_path),
    ])
    assert rc == 0
    [path] = tmp_path.glob("*/roofline.json")
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["decode"]["steps_timed"] == 8 - 1 - 2
    assert result["weights"]["decode_bytes"] > 0
    for key in ["weight_bytes_per_step", "copy_bandwidth_bytes_per_s", "step_time_s", "limit_s", "fraction"]:
        assert result["summary"][key] > 0, key
    assert "fraction of the limit reached" in capsys.readouterr().out
