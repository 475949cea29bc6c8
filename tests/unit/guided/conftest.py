"""The tiny model's tokenizer (same preset and seed, so the same ids) without building weights."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from bowline_runtime.tools.tiny_model import PRESETS, train_tokenizer

    return train_tokenizer(PRESETS["tiny"], seed=0)
