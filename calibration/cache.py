"""Resumable step results in the cache folder (--cache, default OUT_DIR/.cache): each step's output
is saved under a hash of exactly the arguments it depends on, so a killed run restarted with the
same arguments skips finished steps, and a run with another budget reuses the measurements. (Map
scores have their own store, evaluate.ScoreStore, in the same folder.)"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """Content hash of an input file (a changed text or checkpoint invalidates the cache)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


class StepCache:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / ".cache"

    def path(self, step: str, key: str) -> Path:
        return self.root / f"{step}-{key}.pt"

    def get(self, step: str, key: str, compute: Callable[[], Any], log: Callable[[str], None] = print) -> Any:
        path = self.path(step, key)
        if path.exists():
            log(f"[{step}] cached ({path.name})")
            return torch.load(path, weights_only=False)
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)  # atomic: a kill mid-write leaves no half-written result behind
        return value
