"""Fixtures of the calibration tests: the shared tiny random Llama (tests/conftest.py), loaded once."""

from __future__ import annotations

import pytest

from calibration import data
from calibration import model as model_io


@pytest.fixture(scope="session")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir(64)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model with the simulation attention installed, tokenizer, ModelInfo); float32 so comparisons are exact."""
    return model_io.load(tiny_dir, "cpu", "float32")


@pytest.fixture(scope="session")
def windows(tiny):
    _, tokenizer, _ = tiny
    return data.split_tokens(tokenizer, data.default_text(), tokens=128, heldout_tokens=64, seq_len=32, seed=0)
