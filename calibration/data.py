"""Calibration text: user files (plain text or JSONL with a "text" field) or an offline default,
tokenized and cut into fixed-length windows from three disjoint ranges of the text: calibration
(the search), selection (the choice of the map) and report (the numbers the report gives)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.common import CalibrationError

# Where each text's range starts, as a fraction of the text's characters (moved back to a line end): calibration
# windows come from [0, 0.6), selection windows from [0.6, 0.8), report windows from [0.8, 1]. Contiguous ranges
# rather than interleaved windows, so the three texts are different parts of the document (for pydoc_data.topics:
# different topics), not neighbouring windows of the same passages.
RANGES = {"calibration": 0.0, "selection": 0.6, "report": 0.8}


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
    calibration: torch.Tensor  # int64 [num_windows, seq_len]: every search evaluation
    selection: torch.Tensor  # the choice among the front and the uniform maps
    report: torch.Tensor  # the numbers the report gives, scored once per reported map


def split_tokens(tokenizer, text: str, tokens: int, selection_tokens: int, report_tokens: int, seq_len: int,
                 seed: int) -> TokenSplit:
    """Calibration windows drawn (seeded) from the calibration range, selection and report windows spread evenly
    over theirs (so they do not move with the seed)."""
    windows = {name: _windows(tokenizer, part, seq_len) for name, part in _ranges(text).items()}
    need = {name: _count(count, seq_len) for name, count in
            (("calibration", tokens), ("selection", selection_tokens), ("report", report_tokens))}
    if any(len(windows[name]) < need[name] for name in RANGES):
        raise CalibrationError(
            "calibration text too short: " + ", ".join(f"{len(windows[n]) * seq_len} {n}" for n in RANGES)
            + " tokens available, " + ", ".join(f"{need[n] * seq_len}" for n in RANGES) + " requested "
            "(give more --text, or lower --tokens / --selection-tokens / --report-tokens)"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(windows["calibration"]), generator=generator)[:need["calibration"]].sort().values
    return TokenSplit(windows["calibration"][chosen], _spread(windows["selection"], need["selection"]),
                      _spread(windows["report"], need["report"]))


def _ranges(text: str) -> dict[str, str]:
    """The text cut at the RANGES fractions, each cut moved back to the line end before it."""
    cuts = [_line_end(text, fraction) for fraction in RANGES.values()] + [len(text)]
    return {name: text[start:end] for name, start, end in zip(RANGES, cuts, cuts[1:])}


def _line_end(text: str, fraction: float) -> int:
    position = int(len(text) * fraction)
    line_end = text.rfind("\n", 0, position)
    return line_end if line_end > 0 else position


def _spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    return windows[torch.linspace(0, len(windows) - 1, count).round().long()]


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
