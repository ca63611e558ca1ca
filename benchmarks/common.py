"""What every benchmark shares: where results go and which machine made them."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parents[1]


def repo_relative(path: str | None) -> str | None:
    """A path as a results file records it: relative to the repository when inside it, so that the committed
    results name no folder of the machine that made them."""
    if path is None or not Path(path).is_relative_to(ROOT):
        return path
    return str(Path(path).relative_to(ROOT))


# The CPU features that decide which attention kernels run (ours and vLLM's), as /proc/cpuinfo names them.
ISA_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) of the first processor in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("model name", platform.processor()), set(fields.get("flags", "").split())


def cpu_isa() -> list[str]:
    """The kernel-relevant ISA extensions this CPU offers, widest first."""
    return [flag for flag in ISA_FLAGS if flag in _cpuinfo()[1]]


def host_description() -> str:
    """One line: CPU model, cores and ISA, e.g. for a test run's header."""
    model, _ = _cpuinfo()
    return f"{model}, {os.cpu_count()} cores, ISA {' '.join(cpu_isa()) or 'baseline x86-64'}"


def machine_info() -> dict:
    """The machine a number came from: CPU model, cores, ISA, torch threads, and the library versions."""
    import torch

    info = {"cpu": _cpuinfo()[0], "cores": os.cpu_count(), "isa": cpu_isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


def write_json(name: str, result: dict) -> Path:
    """Write results/<name>.json with a timestamp; returns its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
