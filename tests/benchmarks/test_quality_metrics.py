"""The quality and decode-path benchmarks' numbers (benchmarks/quality.py, benchmarks/decode_path.py), on
hand-made log-probs."""

from __future__ import annotations

import pytest

from benchmarks import decode_path, quality


def _run(decoded: list[list[float]], prefilled: list[list[float]]) -> dict:
    return {"sequences": [{"prompt": [1], "tokens": list(range(len(d))), "decode_logprobs": d} for d in decoded],
            "own_prefill": [{"logprobs": p, "best": p} for p in prefilled]}


def test_decode_path_numbers():
    run = _run([[-0.1, -0.5], [-1.0, -2.0]], [[-0.1, -0.4], [-1.0, -2.3]])
    under_auto = [{"logprobs": [-0.2, -1.0], "best": [-0.2, -0.5]}, {"logprobs": [-0.3, -0.3], "best": [-0.3, -0.1]}]
    numbers = decode_path.numbers(run, under_auto)
    assert numbers["decode_tokens"] == 4
    assert numbers["decode_top1_vs_auto"] == 0.5  # tokens 1 and 3 are auto's first choice
    assert numbers["decode_regret"] == pytest.approx((0 + 0.5 + 0 + 0.2) / 4)
    assert numbers["decode_vs_prefill_mean"] == pytest.approx((0 + 0.1 + 0 + 0.3) / 4)
    assert 0.1 < numbers["decode_vs_prefill_p99"] <= 0.3


def test_greedy_agreement_is_the_matching_prefix():
    reference = {"greedy": [[1, 2, 3, 4], [5, 6]]}
    run = {"greedy": [[1, 2, 9, 4], [5, 6]]}
    assert quality.greedy_agreement(reference, run) == pytest.approx((2 / 4 + 1) / 2)


def test_select_configs_keeps_the_baselines_and_refuses_unknown_names():
    from benchmarks.maps import KVConfig, select_configs

    configs = [KVConfig(name, "kvtuner") for name in ("auto", "fp8 (vLLM)", "v2 KV4", "KVTuner 4.00b")]
    assert [c.name for c in select_configs(configs, ["v2 KV4"])] == ["auto", "v2 KV4", "KVTuner 4.00b"]
    assert [c.name for c in select_configs(configs, ["v2 KV4"], keep_baselines=False)] == ["v2 KV4"]
    assert select_configs(configs, None) == configs
    with pytest.raises(SystemExit, match=r"unknown \['v3'\]"):
        select_configs(configs, ["v3"])


def test_committed_results_name_no_folder_of_the_machine_that_made_them():
    from benchmarks.common import ROOT

    files = [*(ROOT / "benchmarks" / "results").glob("*.json"), *(ROOT / "benchmarks" / "calibration").rglob("*.json")]
    assert len(files) > 5
    offenders = [f.name for f in files if any(f'"{prefix}' in f.read_text() for prefix in ("/work/", "/root/", "/home/",
                                                                                            "/tmp/"))]
    assert offenders == []
