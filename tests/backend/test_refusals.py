"""Every bad input of bad_inputs.py is refused while vLLM builds its config (in the API server, before
any engine process starts), with a kvtuner configuration error that names the problem and the fix.
In-process through vLLM's own argument parser and EngineArgs.create_engine_config."""

from __future__ import annotations

from dataclasses import replace

import pytest

vllm = pytest.importorskip("vllm")

from bad_inputs import cases  # noqa: E402
from conftest import kvtuner_args, write_map  # noqa: E402

from kvtuner_vllm.errors import KVTunerConfigError  # noqa: E402


@pytest.fixture(scope="module")
def all_cases(tiny_llama_dir, tmp_path_factory):
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return cases(tiny_llama_dir(64), tmp_path_factory.mktemp("refusals"))


def _engine_config(case, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(case.model), "--enforce-eager", *case.args])
    return EngineArgs.from_cli_args(args).create_engine_config()


@pytest.mark.parametrize("name", ["unreadable", "malformed", "layers", "bits", "group_size", "scheme", "kivi_group",
                                  "window_block", "window_hybrid_manager", "other_model", "unknown_option",
                                  "head_size", "sliding_window", "mla", "hybrid", "encoder_only", "spec_decode",
                                  "batch_invariant", "eager_pipeline"])
def test_refused_with_the_problem_and_the_fix(all_cases, name, monkeypatch):
    case = all_cases[name]
    with pytest.raises(KVTunerConfigError) as refused:
        _engine_config(case, monkeypatch)
    for fragment in case.fragments:
        assert fragment in str(refused.value), f"{fragment!r} missing from: {refused.value}"


def test_a_good_map_passes(all_cases, monkeypatch, tmp_path):
    good = replace(all_cases["malformed"],
                   args=kvtuner_args(write_map(tmp_path / "good.json", [(8, 4)] * 4, residual_length=32)))
    config = _engine_config(good, monkeypatch)
    assert config.cache_config.cache_dtype == "kvtuner"
