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


def test_split_is_seeded_disjoint_and_sized(tiny):
    _, tokenizer, _ = tiny
    text = data.default_text()
    a = data.split_tokens(tokenizer, text, tokens=200, heldout_tokens=100, seq_len=50, seed=1)
    b = data.split_tokens(tokenizer, text, tokens=200, heldout_tokens=100, seq_len=50, seed=1)
    c = data.split_tokens(tokenizer, text, tokens=200, heldout_tokens=100, seq_len=50, seed=2)
    assert a.calibration.shape == (4, 50) and a.heldout.shape == (2, 50)
    assert torch.equal(a.calibration, b.calibration) and not torch.equal(a.calibration, c.calibration)
    assert torch.equal(a.heldout, c.heldout)  # the held-out set does not move with the seed
    assert (a.calibration[:, 0] == tokenizer.bos_token_id).all()
    calibration_rows = {tuple(row) for row in a.calibration.tolist()}
    assert not calibration_rows & {tuple(row) for row in a.heldout.tolist()}


def test_text_too_short(tiny, tmp_path):
    _, tokenizer, _ = tiny
    with pytest.raises(CalibrationError, match="text too short"):
        data.split_tokens(tokenizer, "a few words only", tokens=512, heldout_tokens=64, seq_len=64, seed=0)
