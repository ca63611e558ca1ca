"""How many torch threads a calibration run takes: the cores other processes leave idle now."""

from __future__ import annotations

import pytest

from calibration import pipeline


@pytest.mark.parametrize(("busy_jiffies", "busy_cores", "threads"), [
    (0, 0.0, 2),  # idle: both cores
    (400, 0.4, 2),  # a little work elsewhere: 1.6 cores idle
    (600, 0.6, 1),  # 1.4 cores idle
    (1000, 1.0, 1),  # one core busy
    (2000, 2.0, 1),  # both busy: still one thread
])
def test_threads_follow_the_cores_busy_now(monkeypatch, busy_jiffies, busy_cores, threads):
    """2000 jiffies pass over 2 cores between the two samples; `busy_jiffies` of them are other work."""
    def samples():
        return iter([(10_000, 100_000), (10_000 + busy_jiffies, 102_000)])

    monkeypatch.setattr(pipeline.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1})
    sampled = samples()
    monkeypatch.setattr(pipeline, "cpu_times", lambda: next(sampled))
    assert pipeline.busy_cores() == pytest.approx(busy_cores)
    sampled = samples()
    assert pipeline.cpu_threads() == threads


def test_cpu_times_reads_this_machine():
    busy, total = pipeline.cpu_times()
    assert 0 < busy < total
