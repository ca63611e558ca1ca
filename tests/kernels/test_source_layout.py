"""The layering of csrc/ that docs/design.md maps: every #include points down, never up. The CPU
folders from the bottom: common/ (helpers, plan types, environment, matrix-unit detection),
vector/ (the vector kernel), amx/ (AMX decode, which reuses the vector kernel's helpers), prefill/
(matrix-unit prefill), then the dispatch and launchers at the top of csrc/cpu/. The shared headers
at csrc/'s top (packed_format.h, kernel_params.h, launcher_args.h) include nothing of cpu/ or cuda/."""

from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
# What each CPU folder may include of csrc/cpu (shared csrc/*.h headers are always allowed).
ALLOWED = {
    "common": ("cpu/common/",),
    "vector": ("cpu/common/", "cpu/vector/"),
    "amx": ("cpu/common/", "cpu/vector/", "cpu/amx/"),
    "prefill": ("cpu/common/", "cpu/prefill/"),
}


def includes(path: Path) -> list[str]:
    return INCLUDE.findall(path.read_text())


def test_cpu_folders_include_only_downwards():
    offenders = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((CSRC / "cpu" / folder).rglob("*")):
            if path.suffix not in {".h", ".cpp"}:
                continue
            for name in includes(path):
                if name.startswith("cpu/") and not name.startswith(allowed):
                    offenders.append(f"{path.relative_to(CSRC)} includes {name}")
    assert not offenders, offenders


def test_cpu_folders_hold_every_source_but_the_dispatch():
    top = sorted(p.name for p in (CSRC / "cpu").iterdir() if p.is_file())
    assert top == ["attention.cpp", "attention.h", "cache_write.cpp", "cache_write.h", "launchers.cpp",
                   "route_counts.cpp", "route_counts.h"]


def test_shared_headers_include_no_device_code():
    for path in sorted(CSRC.glob("*.h")):
        assert not [name for name in includes(path) if name.startswith(("cpu/", "cuda/"))], path.name
