"""Decode attention batches runs of similar context lengths instead of padding all to the longest."""

from __future__ import annotations

from bowline_runtime.engine.model_runner import group_by_length


def test_similar_lengths_share_one_group():
    assert group_by_length([1, 2, 3, 8, 9]) == [(0, 5)]


def test_a_long_context_gets_its_own_group():
    sizes = [4, 5, 6, 7, 125]
    groups = group_by_length(sizes)
    assert groups == [(0, 4), (4, 5)]
    padded = sum((b - a) * max(sizes[a:b]) for a, b in groups)
    assert padded <= 1.5 * sum(sizes)  # against 5 x 125 = 625 blocks when padded together


def test_groups_cover_every_decode_once_in_order():
    sizes = sorted([1, 3, 20, 21, 40, 90, 91, 200, 400, 401])
    groups = group_by_length(sizes)
    assert groups[0][0] == 0 and groups[-1][1] == len(sizes)
    assert all(a < b for a, b in groups)
    assert all(groups[i][1] == groups[i + 1][0] for i in range(len(groups) - 1))


def test_no_decodes_no_groups():
    assert group_by_length([]) == []
