"""Calibration text: user files (plain text or JSONL with a "text" field) or an offline default,
tokenized and cut into fixed-length windows, with a held-out part the search never sees."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.common import CalibrationError

HELDOUT_FRACTION = 0.2  # the tail of the text is held out, so held-out windows never overlap calibration ones


def default_text() -> str:
    """The Python documentation's topic pages (~465k characters), shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CalibrationError(f"--text {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"--text {path}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path, raw))
    return raw


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise CalibrationError(f"--text {path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f'--text {path}:{number}: expected an object with a string "text" field')
        texts.append(record["text"])
    return texts


def load_text(files: list[str | Path] | None) -> str:
    return "\n\n".join(read_text_file(f) for f in files) if files else default_text()


@dataclass
class TokenSplit:
    calibration: torch.Tensor  # int64 [num_windows, seq_len]
    heldout: torch.Tensor  # int64 [num_windows, seq_len]


def split_tokens(tokenizer, text: str, tokens: int, heldout_tokens: int, seq_len: int, seed: int) -> TokenSplit:
    """Calibration windows drawn (seeded) from the head of the text, held-out windows evenly from its tail."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELDOUT_FRACTION)))
    cut = cut if cut > 0 else int(len(text) * (1 - HELDOUT_FRACTION))
    head, tail = _windows(tokenizer, text[:cut], seq_len), _windows(tokenizer, text[cut:], seq_len)
    need_calib, need_heldout = _count(tokens, seq_len), _count(heldout_tokens, seq_len)
    if len(head) < need_calib or len(tail) < need_heldout:
        raise CalibrationError(
            f"calibration text too short: {len(head) * seq_len} calibration and {len(tail) * seq_len} held-out "
            f"tokens available, {need_calib * seq_len} and {need_heldout * seq_len} requested "
            "(give more --text, or lower --tokens / --heldout-tokens)"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(head), generator=generator)[:need_calib].sort().values
    spread = torch.linspace(0, len(tail) - 1, need_heldout).round().long()
    return TokenSplit(head[chosen], tail[spread])


def _count(tokens: int, seq_len: int) -> int:
    return max(1, -(-tokens // seq_len))


def _windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Non-overlapping seq_len windows of the text's tokens, each starting with BOS when the model has one."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    count = len(ids) // body
    windows = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
