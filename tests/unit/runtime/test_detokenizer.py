"""Incremental detokenisation and stop strings (engine/detokenizer.py) with the tiny model's real tokenizer."""

from __future__ import annotations

import pytest
from bowline_runtime.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def feed(det: IncrementalDetokenizer, ids: list[int]) -> tuple[str | None, list[str]]:
    """Feed tokens one by one; return the matched stop (if any) and the visible text after each token."""
    seen = []
    for token_id in ids:
        stop = det.add_token(token_id)
        seen.append(det.visible_text)
        if stop is not None:
            return stop, seen
    return None, seen


TEXTS = [
    "Hello, world! How are you today?",
    "你好，世界！今天天气很好。",
    "混合 mixed 文本 text 🚀 ünïcode",
    "  leading spaces\nand\ttabs  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=[], include_stop=False)
    stop, seen = feed(det, ids)
    det.finish()
    assert stop is None
    assert det.visible_text == tokenizer.decode(ids) == text
    # Streamed text only ever grows: nothing shown is later taken back.
    for before, after in zip(seen, seen[1:], strict=False):
        assert after.startswith(before)


def test_multi_byte_characters_never_show_a_replacement_character(tokenizer):
    text = "你好，世界！中文测试，汉字🚀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "the text must contain tokens that are only part of a character"
    det = IncrementalDetokenizer(tokenizer, stop=[], include_stop=False)
    _, seen = feed(det, ids)
    assert all("\ufffd" not in shown for shown in seen)
    assert "\ufffd" not in det.text
    det.finish()
    assert det.visible_text == text


def _split_stop(tokenizer, text: str, stop: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    # The test is only meaningful if no single token holds the whole stop string.
    assert not any(stop in p for p in pieces), pieces
    return ids


def test_stop_string_across_tokens_is_cut(tokenizer):
    text = "one two STOPHERE three four"
    ids = _split_stop(tokenizer, text, "STOPHERE")
    det = IncrementalDetokenizer(tokenizer, stop=["STOPHERE"], include_stop=False)
    stop, _ = feed(det, ids)
    det.finish()
    assert stop == "STOPHERE"
    assert det.visible_text == "one two "


def test_stop_string_kept_with_include_stop(tokenizer):
    text = "one two STOPHERE three four"
    ids = _split_stop(tokenizer, text, "STOPHERE")
    det = IncrementalDetokenizer(tokenizer, stop=["STOPHERE"], include_stop=True)
    stop, _ = feed(det, ids)
    det.finish()
    assert stop == "STOPHERE"
    assert det.visible_text == "one two STOPHERE"


def test_stop_string_inside_a_single_token_cuts_within_it(tokenizer):
    # " world" is one token here: the stop "wor" ends inside it, the text is cut mid-token.
    ids = tokenizer.encode("Hello world again", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["wor"], include_stop=False)
    stop, _ = feed(det, ids)
    assert stop == "wor"
    det.finish()
    assert det.visible_text == "Hello "


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["delta", "beta"], include_stop=False)
    stop, _ = feed(det, ids)
    assert stop == "beta"
    assert det.text == "alpha "


def test_chinese_stop_string(tokenizer):
    text = "今天天气很好。明天下雨"
    ids = tokenizer.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["很好"], include_stop=False)
    stop, seen = feed(det, ids)
    det.finish()
    assert stop == "很好"
    assert det.visible_text == "今天天气"
    assert all("\ufffd" not in s for s in seen)


@pytest.mark.parametrize("stop_str", ["STOPHERE", "####", "three"])
def test_visible_text_never_exposes_a_partial_stop_string(tokenizer, stop_str):
    text = f"one ST two ## x thr then {stop_str} tail"
    ids = tokenizer.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=[stop_str], include_stop=False)
    stop, seen = feed(det, ids)
    assert stop == stop_str
    final = det.visible_text
    for shown in seen:
        # Whatever was shown mid-stream is a prefix of the final text: no stop prefix was shown and retracted.
        assert final.startswith(shown), (shown, final)
        assert stop_str not in shown


def test_text_without_a_match_is_held_back_only_while_it_could_start_a_stop(tokenizer):
    ids = tokenizer.encode("abc ST", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["STOP"], include_stop=False)
    stop, _ = feed(det, ids)
    assert stop is None
    assert det.text == "abc ST"
    assert len(det.visible_text) >= len(det.text) - (len("STOP") - 1)
    assert not det.visible_text.endswith("ST")
    det.finish()  # the request ended without the stop: the held text is released
    assert det.visible_text == "abc ST"


def test_check_stop_false_ignores_stop_strings(tokenizer):
    ids = tokenizer.encode("x STOPHERE y", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["STOPHERE"], include_stop=False)
    for token_id in ids:
        assert det.add_token(token_id, check_stop=False) is None
    det.finish()
    assert det.visible_text == "x STOPHERE y"


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    det = IncrementalDetokenizer(tokenizer, stop=[], include_stop=False)
    feed(det, ids)
    det.finish()
    assert det.visible_text == "hi"
    det = IncrementalDetokenizer(tokenizer, stop=[], include_stop=False, skip_special_tokens=False)
    feed(det, ids)
    det.finish()
    assert det.visible_text == "hi" + tokenizer.eos_token


def test_finish_flushes_an_incomplete_utf8_tail_so_text_equals_decode(tokenizer):
    """Issue 17, defect 8: a generation that ends inside a multi-byte character must not drop the
    held-back bytes; they show as U+FFFD, exactly as decode(ids) shows them."""
    ids = tokenizer.encode("ok 🚀", add_special_tokens=False)
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the last token completes the emoji
    det = IncrementalDetokenizer(tokenizer, stop=[], include_stop=False)
    feed(det, ids[:-1])
    assert not det.visible_text.endswith("\ufffd")  # still held back while more tokens may come
    det.finish()
    assert det.visible_text == tokenizer.decode(ids[:-1])


def test_finish_after_a_stop_string_keeps_the_cut(tokenizer):
    ids = tokenizer.encode("abc STOP 🚀", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stop=["STOP"], include_stop=False)
    stop, _ = feed(det, ids[:-1])
    assert stop == "STOP"
    det.finish()
    assert det.visible_text == "abc "


@pytest.mark.parametrize("skip", [True, False])
def test_the_direct_decoder_returns_what_tokenizer_decode_returns(tokenizer, skip):
    """The streaming path calls the Rust tokenizer directly (decoder_for): same text for any ids,
    special tokens included, and the direct path is really the one taken for this tokenizer."""
    import random

    from bowline_runtime.engine.detokenizer import decoder_for

    decode = decoder_for(tokenizer, skip)
    assert decode.__code__ is not decoder_for(object(), skip).__code__  # not the generic fallback
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_keeps_its_own_decode(tokenizer):
    import copy

    from bowline_runtime.engine.detokenizer import decoder_for

    cleaning = copy.copy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    ids = tokenizer.encode("a , b . c", add_special_tokens=False)
    calls = []
    original = cleaning.decode
    cleaning.decode = lambda *a, **k: calls.append(a) or original(*a, **k)
    assert decoder_for(cleaning, True)(ids) == original(ids, skip_special_tokens=True)
    assert calls, "the tokenizer's own decode was not used"
