"""Batched sampling (engine/sampler.py): the pure tensor maths, then the Sampler on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
from bowline_runtime.engine.sampler import (
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
    exponential_race,
    token_logprobs,
)
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.sequence import Sequence

EOS = 0
VOCAB = 8
PROBS = [0.5, 0.3, 0.15, 0.05]  # a distribution with a clear order


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seq_id=0, seed=None) -> Sequence:
    seq = Sequence(seq_id, f"r{seq_id}", 0, [*prompt, *output], len(prompt), params)
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


def sampler() -> Sampler:
    return Sampler(VOCAB, {EOS})


def row(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float32)


def kept(masked: torch.Tensor) -> list[int]:
    return torch.isfinite(masked[0]).nonzero().flatten().tolist()


# --- top-k / top-p / min-p -------------------------------------------------------------------------


def _filter(top_k=0, top_p=1.0, min_p=0.0, probs=PROBS):
    logits = torch.log(torch.tensor([probs]))
    return apply_top_k_top_p_min_p(
        logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
    )


def test_no_filter_keeps_everything():
    assert kept(_filter()) == [0, 1, 2, 3]


def test_top_k_keeps_the_k_most_likely():
    assert kept(_filter(top_k=1)) == [0]
    assert kept(_filter(top_k=2)) == [0, 1]
    assert kept(_filter(top_k=100)) == [0, 1, 2, 3]  # k beyond the vocabulary: everything


@pytest.mark.parametrize(("top_p", "expected"), [(0.4, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, expected):
    assert kept(_filter(top_p=top_p)) == expected


def test_top_p_works_on_unsorted_logits_and_keeps_their_values():
    probs = [0.05, 0.3, 0.5, 0.15]
    out = _filter(top_p=0.7, probs=probs)
    assert kept(out) == [1, 2]
    assert torch.allclose(out[0, [1, 2]], torch.log(torch.tensor([0.3, 0.5])))


@pytest.mark.parametrize(("min_p", "expected"), [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (1.0, [0])])
def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(min_p, expected):
    assert kept(_filter(min_p=min_p)) == expected


def test_filters_are_per_row():
    logits = torch.log(torch.tensor([PROBS, PROBS, PROBS]))
    out = apply_top_k_top_p_min_p(
        logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    )
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in out] == [[0], [0, 1], [0, 1, 2, 3]]


# --- draws -----------------------------------------------------------------------------------------


def test_exponential_race_draws_in_proportion_to_probability():
    torch.manual_seed(0)
    probs = torch.tensor([PROBS] * 4000)
    draws = exponential_race(probs, [None] * 4000)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03)


def test_exponential_race_never_draws_a_zero_probability_token():
    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3]] * 2000)
    draws = exponential_race(probs, [None] * 2000)
    assert set(draws.tolist()) == {1, 3}


def test_seeded_row_is_reproducible_whatever_else_is_in_the_batch():
    params = SamplingParams(temperature=1.0)
    flat = torch.zeros(VOCAB)  # uniform: every draw is pure noise

    def run(neighbours: int) -> list[int]:
        torch.manual_seed(1234 + neighbours)  # different global noise for unseeded rows each time
        seeded = make_seq(params, seed=42)
        others = [make_seq(params, seq_id=i + 1) for i in range(neighbours)]
        batch = others[: neighbours // 2] + [seeded] + others[neighbours // 2 :]
        where = batch.index(seeded)
        logits = torch.randn(len(batch), VOCAB) * 3
        logits[where] = flat
        return [sampler()(logits, batch).token_ids[where] for _ in range(20)]

    alone = run(0)
    assert len(set(alone)) > 1  # the draws really are random...
    assert run(3) == alone  # ...and the same among other rows
    assert run(6) == alone


def test_different_seeds_draw_differently():
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, VOCAB)
    a, b = make_seq(params, seed=1), make_seq(params, seed=2)
    draws_a = [sampler()(logits, [a]).token_ids[0] for _ in range(20)]
    draws_b = [sampler()(logits, [b]).token_ids[0] for _ in range(20)]
    assert draws_a != draws_b


# --- the Sampler -----------------------------------------------------------------------------------


def test_greedy_is_argmax_per_row():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    seqs = [make_seq(SamplingParams(temperature=0.0), seq_id=i) for i in range(5)]
    assert sampler()(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_1_is_greedy_even_at_high_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 0.1  # nearly flat: a real draw would wander
    seqs = [make_seq(SamplingParams(temperature=2.0, top_k=1), seq_id=i) for i in range(4)]
    for _ in range(10):
        assert sampler()(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_row_stays_argmax_beside_sampled_rows():
    torch.manual_seed(0)
    logits = torch.zeros(2, VOCAB)
    logits[0, 5] = 0.5  # a small lead only
    seqs = [make_seq(SamplingParams(temperature=0.0)), make_seq(SamplingParams(temperature=1.0), seq_id=1)]
    drawn = set()
    for _ in range(20):
        ids = sampler()(logits, seqs).token_ids
        assert ids[0] == 5
        drawn.add(ids[1])
    assert len(drawn) > 1


def test_sampling_draws_only_from_the_top_p_nucleus():
    logits = torch.log(torch.tensor([PROBS + [1e-9] * (VOCAB - 4)]))
    seq = make_seq(SamplingParams(temperature=1.0, top_p=0.7), seed=0)
    draws = {sampler()(logits, [seq]).token_ids[0] for _ in range(50)}
    assert draws == {0, 1}


def test_sampling_respects_min_p_and_top_k():
    logits = torch.log(torch.tensor([PROBS + [1e-9] * (VOCAB - 4)]))
    seq = make_seq(SamplingParams(temperature=1.0, min_p=0.2), seed=0)
    assert {sampler()(logits, [seq]).token_ids[0] for _ in range(80)} == {0, 1, 2}
    seq = make_seq(SamplingParams(temperature=1.0, top_k=2), seed=0)
    assert {sampler()(logits, [seq]).token_ids[0] for _ in range(50)} == {0, 1}


def test_low_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25] + [1e-9] * (VOCAB - 3)]))
    seq = make_seq(SamplingParams(temperature=0.05), seed=0)
    assert {sampler()(logits, [seq]).token_ids[0] for _ in range(30)} == {0}


def test_padded_vocabulary_columns_are_never_sampled():
    logits = torch.zeros(1, VOCAB + 4)
    logits[0, VOCAB:] = 100.0  # padding columns the tokenizer has no tokens for
    assert sampler()(logits, [make_seq(SamplingParams(temperature=0.0))]).token_ids[0] < VOCAB


def test_logit_bias_adds_to_the_logits():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 5.0
    greedy = SamplingParams(temperature=0.0, logit_bias={6: 10.0})
    assert sampler()(logits, [make_seq(greedy)]).token_ids == [6]
    assert sampler()(logits, [make_seq(SamplingParams(temperature=0.0, logit_bias={6: 4.0}))]).token_ids == [2]
    banned = SamplingParams(temperature=0.0, logit_bias={2: -100.0})
    assert sampler()(logits, [make_seq(banned)]).token_ids != [2]


def test_logit_bias_does_not_leak_to_other_rows():
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = 1.0
    seqs = [make_seq(SamplingParams(temperature=0.0, logit_bias={6: 10.0})), make_seq(SamplingParams(temperature=0.0), seq_id=1)]
    assert sampler()(logits, seqs).token_ids == [6, 2]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=3),
        SamplingParams(temperature=0.0, logit_bias={6: 10.0}),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.0, min_tokens=2),
        SamplingParams(temperature=0.0, logprobs=2),
    ],
    ids=["greedy", "sampled", "logit_bias", "penalties", "min_tokens", "logprobs"],
)
def test_the_callers_logits_are_never_changed(params):
    """Rows no processor touches are read in place, the others on a copy: the model's logits stay as given."""
    logits = torch.log(torch.tensor([[0.4, 0.1, 0.2, 0.05, 0.05, 0.1, 0.05, 0.05]] * 2))
    before = logits.clone()
    seqs = [make_seq(params, output=(2,)), make_seq(SamplingParams(temperature=0.0), seq_id=1)]
    result = sampler()(logits, seqs)
    assert torch.equal(logits, before)
    assert result.token_ids[1] == 0  # the plain greedy row beside it: argmax of the model's logits
    if params.logit_bias:
        assert result.token_ids[0] == 6


def test_single_token_bad_word_is_never_produced():
    logits = torch.arange(VOCAB, dtype=torch.float32).unsqueeze(0)  # argmax 7, then 6
    seq = make_seq(SamplingParams(temperature=0.0))
    seq.bad_word_ids = [[7]]
    assert sampler()(logits, [seq]).token_ids == [6]


def test_multi_token_bad_word_blocks_only_its_last_token_after_its_prefix():
    logits = torch.arange(VOCAB, dtype=torch.float32).unsqueeze(0)
    params = SamplingParams(temperature=0.0)
    after_prefix = make_seq(params, output=(4, 5))
    after_prefix.bad_word_ids = [[4, 5, 7]]
    assert sampler()(logits, [after_prefix]).token_ids == [6]
    partial = make_seq(params, output=(5,))  # only part of the prefix produced
    partial.bad_word_ids = [[4, 5, 7]]
    assert sampler()(logits, [partial]).token_ids == [7]
    prompt_only = make_seq(params, prompt=(4, 5), output=())  # the prefix is in the prompt, not the output
    prompt_only.bad_word_ids = [[4, 5, 7]]
    assert sampler()(logits, [prompt_only]).token_ids == [7]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0  # a stop token id
    logits[0, 5] = 1.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert sampler()(logits, [make_seq(params, output=())]).token_ids == [5]
    assert sampler()(logits, [make_seq(params, output=(6,))]).token_ids == [5]
    assert sampler()(logits, [make_seq(params, output=(6, 6))]).token_ids == [EOS]
    no_min = SamplingParams(temperature=0.0, stop_token_ids=[3])
    assert sampler()(logits, [make_seq(no_min)]).token_ids == [EOS]


def test_min_tokens_with_ignore_eos_leaves_eos_as_an_ordinary_token():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sampler()(logits, [make_seq(params)]).token_ids == [EOS]


# --- penalties -------------------------------------------------------------------------------------


def test_apply_penalties_known_numbers():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, True, False]])
    one = torch.tensor([1.0])
    zero = torch.tensor([0.0])
    # Repetition: positive logits divided, negative multiplied, unseen untouched.
    rep = apply_penalties(logits, counts, seen, torch.tensor([2.0]), zero, zero)
    assert torch.allclose(rep, torch.tensor([[1.0, -4.0, 0.5, 0.5]]))
    # Frequency: minus penalty x count.
    freq = apply_penalties(logits, counts, seen, one, torch.tensor([0.5]), zero)
    assert torch.allclose(freq, torch.tensor([[1.0, -2.0, 0.5, 0.5]]))
    # Presence: minus penalty once for anything that appeared.
    pres = apply_penalties(logits, counts, seen, one, zero, torch.tensor([0.25]))
    assert torch.allclose(pres, torch.tensor([[1.75, -2.0, 0.75, 0.5]]))
    # Negative penalties reward repetition.
    encourage = apply_penalties(logits, counts, seen, one, torch.tensor([-1.0]), zero)
    assert torch.allclose(encourage, torch.tensor([[4.0, -2.0, 2.0, 0.5]]))


def _processed(params: SamplingParams, prompt, output, logits) -> torch.Tensor:
    s = sampler()
    return s._process(logits.clone(), [make_seq(params, prompt=prompt, output=output)])


def test_frequency_and_presence_count_output_tokens_only():
    logits = torch.ones(1, VOCAB)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = _processed(params, prompt=(1, 1, 1), output=(2, 2, 3), logits=logits)
    expected = torch.ones(VOCAB)
    expected[2] -= 2 * 0.5 + 0.25
    expected[3] -= 1 * 0.5 + 0.25
    assert torch.allclose(out[0], expected)  # token 1 (prompt only) untouched


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.full((1, VOCAB), 2.0)
    logits[0, 4] = -2.0
    out = _processed(SamplingParams(repetition_penalty=2.0), prompt=(1, 4), output=(3,), logits=logits)
    expected = torch.full((VOCAB,), 2.0)
    expected[[1, 3]] = 1.0
    expected[4] = -4.0
    assert torch.allclose(out[0], expected)


def test_penalties_change_the_greedy_choice_and_only_for_their_row():
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 1.0
    logits[:, 6] = 0.8
    penalised = make_seq(SamplingParams(temperature=0.0, presence_penalty=0.5), output=(5,))
    plain = make_seq(SamplingParams(temperature=0.0), output=(5,), seq_id=1)
    assert sampler()(logits, [penalised, plain]).token_ids == [6, 5]


# --- logprobs --------------------------------------------------------------------------------------


def test_token_logprobs_value_rank_and_sorted_top():
    lp = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0, 0.0]), dim=-1)
    entry = token_logprobs(lp, 2, 3)
    assert entry.token_id == 2
    assert entry.logprob == pytest.approx(float(lp[2]))
    assert entry.logprob <= 0
    assert entry.rank == 2
    assert [t for t, _ in entry.top] == [1, 2, 0]
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)
    assert token_logprobs(lp, 1, 0).rank == 1 and token_logprobs(lp, 1, 0).top == []
    assert token_logprobs(lp, 3, 0).rank == 4


def test_sampler_logprobs_are_raw_model_logprobs_by_default():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 2
    params = SamplingParams(temperature=0.5, presence_penalty=1.0, logprobs=3)
    seq = make_seq(params, output=(4,), seed=3)
    result = sampler()(logits, [seq])
    tok = result.token_ids[0]
    entry = result.logprobs[0]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert entry.token_id == tok
    assert entry.logprob == pytest.approx(float(raw[tok]), abs=1e-5)
    assert entry.logprob <= 0
    assert entry.rank == int((raw > raw[tok]).sum()) + 1
    assert [t for t, _ in entry.top] == raw.argsort(descending=True)[:3].tolist()


def test_no_logprobs_unless_asked():
    logits = torch.zeros(2, VOCAB)
    seqs = [make_seq(SamplingParams(temperature=0.0)), make_seq(SamplingParams(temperature=0.0, logprobs=0), seq_id=1)]
    lps = sampler()(logits, seqs).logprobs
    assert lps[0] is None
    assert lps[1] is not None and lps[1].top == []


def test_temp_scaled_logprobs_divide_the_logits_by_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    temp = 0.5
    raw_seq = make_seq(SamplingParams(temperature=temp, logprobs=1), seed=5)
    scaled_seq = make_seq(SamplingParams(temperature=temp, logprobs=1, temp_scaled_logprobs=True), seed=5)
    raw_result = sampler()(logits, [raw_seq])
    scaled_result = sampler()(logits, [scaled_seq])
    tok = raw_result.token_ids[0]
    assert scaled_result.token_ids[0] == tok  # same seed, same draw: only the reported numbers differ
    raw, scaled = raw_result.logprobs[0], scaled_result.logprobs[0]
    assert raw.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[tok]), abs=1e-5)
    assert scaled.logprob == pytest.approx(float(torch.log_softmax(logits[0] / temp, -1)[tok]), abs=1e-5)
    assert scaled.logprob != pytest.approx(raw.logprob, abs=1e-3)
    assert scaled.top[0][1] > raw.top[0][1]  # a sharper distribution: the top token is more likely


def test_temp_scaled_logprobs_are_raw_for_greedy_temperature_zero():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    seq = make_seq(SamplingParams(temperature=0.0, logprobs=0, temp_scaled_logprobs=True))
    entry = sampler()(logits, [seq]).logprobs[0]
    assert entry.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[0]), abs=1e-5)


def test_temp_scaled_logprobs_apply_with_top_k_1():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    seq = make_seq(SamplingParams(temperature=0.5, top_k=1, logprobs=0, temp_scaled_logprobs=True))
    entry = sampler()(logits, [seq]).logprobs[0]
    assert entry.logprob == pytest.approx(float(torch.log_softmax(logits[0] / 0.5, -1)[0]), abs=1e-5)


def test_top_p_normalized_logprobs_renormalise_over_the_nucleus():
    logits = torch.log(torch.tensor([PROBS + [1e-9] * (VOCAB - 4)]))
    params = SamplingParams(temperature=1.0, top_p=0.7, logprobs=4, top_p_normalized_logprobs=True)
    seq = make_seq(params, seed=0)
    result = sampler()(logits, [seq])
    tok, entry = result.token_ids[0], result.logprobs[0]
    assert tok in (0, 1)
    nucleus = PROBS[0] + PROBS[1]
    assert entry.logprob == pytest.approx(math.log(PROBS[tok] / nucleus), abs=1e-5)
    top = dict(entry.top)
    assert math.exp(top[0]) + math.exp(top[1]) == pytest.approx(1.0, abs=1e-5)
    assert [v for t, v in entry.top if t not in (0, 1)] == [float("-inf")] * 2  # outside the nucleus
    plain = sampler()(logits, [make_seq(SamplingParams(temperature=1.0, top_p=0.7, logprobs=0), seed=0)])
    assert plain.logprobs[0].logprob == pytest.approx(math.log(PROBS[plain.token_ids[0]]), abs=1e-5)
