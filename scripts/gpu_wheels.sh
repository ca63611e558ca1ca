#!/usr/bin/env bash
# Fetches what scripts/gpu_check.sh needs on the bare GPU image and the image may lack: pytest and
# its pure-Python dependencies for Python 3.10-3.13, and setuptools (torch.utils.cpp_extension
# imports it; torch's wheels below Python 3.12 may not require it), as py3-none-any wheels, into
# .gpu-wheels/ (gitignored). The GPU session carries that folder with the tree (the `run` tool's
# `carry`); gpu_check.sh installs from it, offline, into a throwaway folder (never the image's
# site-packages), and only what the image lacks.
#
# Usage: bash scripts/gpu_wheels.sh [DIR]        (default: .gpu-wheels in the repo root)
# Needs pip and PyPI (or the machine's configured index). The versions are pinned: pytest's own
# requirements (exceptiongroup and tomli below Python 3.11, typing_extensions for exceptiongroup
# below 3.13) are listed by hand because `pip download` evaluates markers for the interpreter that
# runs it, not for --python-version. About 3 MiB.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/.gpu-wheels}"
PYTHON="${PYTHON:-$( [[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || echo python3)}"

# gpu_check.sh's wheels phase installs `pytest` and/or `setuptools` and lets pip pick the rest
# (tests/test_packaging.py checks that pytest's requirements are all here).
WHEELS=(
  pytest==9.2.0
  iniconfig==2.3.1
  pluggy==1.7.0
  packaging==26.4
  pygments==2.21.0
  exceptiongroup==1.3.2
  tomli==2.5.0
  typing_extensions==4.16.0
  setuptools==78.1.1
)

mkdir -p "$dest"
rm -f "$dest"/*.whl
# --implementation py --abi none --platform any: pure-Python wheels only (tomli also ships
# compiled ones); --python-version 3.10: the oldest interpreter the image may have.
"$PYTHON" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
  --implementation py --abi none --platform any --python-version 3.10 -d "$dest" "${WHEELS[@]}"
count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
if ((count != ${#WHEELS[@]})); then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $dest, found $count" >&2
  exit 1
fi
echo "gpu_wheels: $count wheels, $(du -sh "$dest" | cut -f1) in $dest"
