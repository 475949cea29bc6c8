"""The quantized-weights benchmark's arithmetic: bytes a step reads per format, ratios, the rotating order."""

from __future__ import annotations

from bench import quant_bench

SHAPES = [(512, 512), (1536, 512), (512, 1536)]  # (out, in) of three decoder Linear layers


def test_bytes_per_step_shrink_with_the_format():
    weights = sum(o * i for o, i in SHAPES)
    float_bytes = 4 * weights + 1000  # the layers plus 1000 bytes of head and norms
    assert quant_bench.quantized_decode_bytes(float_bytes, SHAPES, "float32", 128) == float_bytes
    int8 = quant_bench.quantized_decode_bytes(float_bytes, SHAPES, "int8", 128)
    assert int8 == 1000 + weights + 4 * (512 + 1536 + 512)
    awq = quant_bench.quantized_decode_bytes(float_bytes, SHAPES, "awq", 128)
    groups = 512 * 4 + 1536 * 4 + 512 * 12
    assert awq == 1000 + weights // 2 + groups * 2 + groups // 2
    assert awq < int8 < float_bytes
    # an LM head of 200 weights among the 1000 bytes, kept in float16 by the AWQ checkpoint: 400 bytes fewer
    assert quant_bench.quantized_decode_bytes(float_bytes, SHAPES, "awq", 128, half_head=200) == awq - 400
    assert quant_bench.quantized_decode_bytes(float_bytes, SHAPES, "int8", 128, half_head=200) == int8


def test_ratios_are_against_float32_at_the_same_concurrency():
    points = [{"variant": "float32", "concurrency": 1, "output_tokens_per_s": 10.0},
              {"variant": "awq", "concurrency": 1, "output_tokens_per_s": 25.0},
              {"variant": "awq", "concurrency": 8, "output_tokens_per_s": 50.0}]
    out = quant_bench.ratios(points)
    assert [p["vs_float32"] for p in out] == [1.0, 2.5, None]


def test_schedule_rotates_the_variants():
    assert quant_bench.schedule(["float32", "int8", "awq"], [1, 8]) == [
        ("float32", 1), ("int8", 1), ("awq", 1), ("int8", 8), ("awq", 8), ("float32", 8)]
