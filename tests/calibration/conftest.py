"""Fixtures of the calibration tests: the shared tiny random Llama (tests/conftest.py), loaded once, and its
windows (sizes in tiny_windows.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_windows import SEQ_LEN, TEXT_CHARS

from calibration import data
from calibration import model as model_io


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The machine runs other work: one torch thread avoids OpenMP spin-waiting on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    text = data.default_text()[:TEXT_CHARS]
    return data.split_tokens(tokenizer, text, tokens=128, selection_tokens=128, report_tokens=128, seq_len=SEQ_LEN,
                             seed=0)
