"""README numbers come from the results files: the generated sections are what `python -m benchmarks report`
renders from benchmarks/results/*.json and benchmarks/calibration/*/precision_map.json now, and the
hand-written prose carries no benchmark number that could go stale (ratios, percentages, throughputs)."""

from __future__ import annotations

import re

from benchmarks import report

# A measured number: a ratio (1.46x), a percentage (+0.5%), a throughput or a bandwidth. 1.00x is the
# definition of a tie in the prose, not a measurement.
MEASURED = re.compile(r"(?<![\w.])[+-]?\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:x\b|%|\s?tok/s|\s?GB/s)")


def prose(readme: str) -> str:
    """The README less its generated sections."""
    for begin, end in ((report.BEGIN, report.END), (report.CALIBRATION_BEGIN, report.CALIBRATION_END)):
        head, rest = readme.split(begin, 1)
        readme = head + rest.split(end, 1)[1]
    return readme


def test_generated_section_matches_the_results_files():
    readme = report.README.read_text()
    assert report.with_results(readme) == readme, "README is stale: run `python -m benchmarks report`"


def test_prose_has_no_measured_numbers():
    found = [m for m in MEASURED.findall(prose(report.README.read_text())) if m != "1.00x"]
    assert not found, f"benchmark numbers outside the generated sections (generate them from the JSON): {found}"


def test_the_number_pattern_sees_what_it_must():
    text = "KV4 serves 1.46x auto, +0.5% perplexity, 0.86x to 1.6x, 165.5 tok/s, 17.4 GB/s, 27-32% of a step"
    assert MEASURED.findall(text) == ["1.46x", "+0.5%", "0.86x", "1.6x", "165.5 tok/s", "17.4 GB/s", "27-32%"]
    assert MEASURED.findall("KV4, K8V4, head size 128, x86-64, sm_90, 2 cores") == []
