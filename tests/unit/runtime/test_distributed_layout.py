"""Multi-node settings: LWS variables as defaults, the rank layout over nodes and stages, the layer split."""

from __future__ import annotations

import pytest
from bowline_runtime.config import build_parser, config_from_args
from bowline_runtime.engine.distributed import Layout
from bowline_runtime.models.pipeline_parallel import stage_layers

LWS = {"LWS_LEADER_ADDRESS": "big-0.big.ns", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}


def _config(argv: list[str], env: dict[str, str]):
    return config_from_args(build_parser().parse_args(["--model", "m", *argv]), env)


def test_a_leader_worker_set_pod_needs_no_rank_flags():
    config = _config(["--tensor-parallel-size", "16"], LWS)
    assert (config.master_addr, config.nnodes, config.node_rank) == ("big-0.big.ns", 2, 1)


def test_flags_and_bowline_variables_win_over_lws_variables():
    config = _config(["--node-rank", "0", "--tensor-parallel-size", "2"], {**LWS, "BOWLINE_MASTER_ADDR": "10.0.0.1"})
    assert (config.master_addr, config.node_rank) == ("10.0.0.1", 0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--nnodes", "2", "--tensor-parallel-size", "3"], "must split evenly over --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "2", "--tensor-parallel-size", "2"], "--node-rank must be in [0, 2)"),
    (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be >= 1"),
])
def test_impossible_layouts_are_refused_before_anything_starts(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        _config(argv, {})


def test_tp_within_a_node_and_pp_across_nodes():
    layout = Layout(tensor_parallel_size=8, pipeline_parallel_size=2, nnodes=2, node_rank=1)
    assert layout.world_size == 16 and layout.local_size == 8
    assert list(layout.local_ranks) == list(range(8, 16))
    assert {layout.pp_rank(r) for r in layout.local_ranks} == {1}  # the whole second stage on node 1
    assert [layout.local_rank(r) for r in (8, 15)] == [0, 7]
    assert layout.describe(9) == "rank 9 (node 1, tp rank 1, pp stage 1)"


def test_layers_split_evenly_with_the_extra_ones_first():
    assert [list(stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        stage_layers(2, 3, 0)


def test_head_counts_refuse_a_size_that_splits_them_naming_the_flag():
    from types import SimpleNamespace

    from bowline_runtime.models.tensor_parallel import check_divisible

    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2)
    assert check_divisible(config, 2) == 2
    with pytest.raises(ValueError, match=r"^--tensor-parallel-size 4 must divide the model's 8 attention heads "
                                         r"and 2 key/value heads$"):
        check_divisible(config, 4)
    with pytest.raises(ValueError, match=r"--speculative-draft-tensor-parallel-size 4 must divide the draft "
                                         r"model's 8 .* \(or use 1"):
        check_divisible(config, 4, "--speculative-draft-tensor-parallel-size", "the draft model's",
                        " (or use 1: the draft unsharded beside rank 0)")
