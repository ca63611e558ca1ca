import json

import pytest
import torch

from calibration import data
from calibration.common import CalibrationError


def test_default_text_is_large_and_offline():
    assert len(data.default_text()) > 400_000


def test_jsonl_and_plain_text(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    plain = tmp_path / "b.txt"
    plain.write_text("plain words")
    assert data.load_text([jsonl, plain]) == "first\n\nsecond\n\nplain words"


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2"):
        data.load_text([path])


def test_split_is_seeded_and_sized(tiny):
    _, tokenizer, _ = tiny
    text = data.default_text()
    a, b, c = (data.split_tokens(tokenizer, text, tokens=200, selection_tokens=100, report_tokens=150, seq_len=50,
                                 seed=seed) for seed in (1, 1, 2))
    assert a.calibration.shape == (4, 50) and a.selection.shape == (2, 50) and a.report.shape == (3, 50)
    assert torch.equal(a.calibration, b.calibration) and not torch.equal(a.calibration, c.calibration)
    assert torch.equal(a.selection, c.selection) and torch.equal(a.report, c.report)  # they do not move with the seed
    assert all((t[:, 0] == tokenizer.bos_token_id).all() for t in (a.calibration, a.selection, a.report))


def test_the_three_texts_come_from_disjoint_ranges(tiny):
    """A text whose three ranges (60%, 20%, 20% of its lines) use different words: every window of each split is a
    piece of its own range and of no other."""
    _, tokenizer, _ = tiny
    words = {"calibration": "apple banana", "selection": "violet plums", "report": "thunder gale"}
    assert len({len(w) for w in words.values()}) == 1  # equal line lengths: the cuts fall between the ranges
    lines = {"calibration": 600, "selection": 200, "report": 200}
    ranges = {name: "".join(f"{words[name]} {i % 10}\n" for i in range(lines[name])) for name in words}
    split = data.split_tokens(tokenizer, "".join(ranges.values()), tokens=500, selection_tokens=300,
                              report_tokens=300, seq_len=50, seed=0)
    for name in words:
        for window in getattr(split, name):
            piece = tokenizer.decode(window[1:]).strip()  # (after BOS)
            assert [other for other in ranges if piece in ranges[other]] == [name]


def test_text_too_short(tiny, tmp_path):
    _, tokenizer, _ = tiny
    with pytest.raises(CalibrationError, match="text too short"):
        data.split_tokens(tokenizer, "a few words only", tokens=512, selection_tokens=64, report_tokens=64, seq_len=64,
                          seed=0)
