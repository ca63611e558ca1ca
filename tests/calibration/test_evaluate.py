import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK

from calibration import evaluate, simulate
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption, pair
from calibration.evaluate import Evaluator, Reference, Scores, ScoreStore

KIVI = FormatOption("kivi", 32, 16, 16)
KV16, KV8, KV4, K4V2, KV2 = (SEARCH_PAIRS.index(pair(*b)) for b in [(16, 16), (8, 8), (4, 4), (4, 2), (2, 2)])


def _evaluator(tiny, windows, tmp_path, state_bytes=1 << 28, name="scores.jsonl"):
    model, _, _ = tiny
    return Evaluator(model, windows.calibration, BLOCK, 1, ScoreStore(tmp_path / name), torch.float32, state_bytes)


def _direct(tiny, windows, candidate: Candidate) -> Scores:
    """The scores from plain full forward passes of the model under the map, without the evaluator."""
    model, _, info = tiny
    ids = windows.calibration
    with torch.inference_mode():
        with simulate.served(model, Candidate(KIVI, (KV16,) * info.num_layers).layer_formats(64, torch.float32),
                             BLOCK):
            reference = model(ids, use_cache=False).logits[:, :-1]
        with simulate.served(model, candidate.layer_formats(64, torch.float32), BLOCK):
            logits = model(ids, use_cache=False).logits[:, :-1]
    count = ids[:, 1:].numel()
    kl = Reference(reference).kl(logits).sum().item() / count
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item() / count
    return Scores(kl, nll)


def test_unquantized_map_has_zero_kl(tiny, windows, tmp_path):
    _, _, info = tiny
    evaluator = _evaluator(tiny, windows, tmp_path)
    assert evaluator.score(Candidate(KIVI, (KV16,) * info.num_layers)).kl == 0.0
    assert evaluator.unquantized.kl == 0.0 and evaluator.unquantized.ppl > 1


def test_prefix_states_give_the_same_scores_as_full_forwards(tiny, windows, tmp_path):
    _, _, info = tiny
    evaluator = _evaluator(tiny, windows, tmp_path)
    first = Candidate(KIVI, (KV4, K4V2, KV4, KV8))
    second = Candidate(KIVI, (KV4, K4V2, KV2, KV2))  # shares layers 0-1 with `first`
    evaluator.score_all([first, second])
    assert evaluator.states.layers_reused == 2 * len(evaluator.batches)  # two layers per batch not rerun
    for candidate in (first, second):
        scores, direct = evaluator.store[candidate.key], _direct(tiny, windows, candidate)
        assert scores.kl == pytest.approx(direct.kl, rel=1e-5) and scores.nll == pytest.approx(direct.nll, rel=1e-6)
    fresh = _evaluator(tiny, windows, tmp_path, state_bytes=0, name="fresh.jsonl")
    assert fresh.score(second) == evaluator.store[second.key]  # bit-identical without any reused state
    assert fresh.states.layers_reused == 0


def test_scores_do_not_depend_on_how_many_positions_are_projected_at_once(tiny, windows, tmp_path, monkeypatch):
    """Projecting 5 positions at a time changes the logits only by matmul rounding (d); KL and NLL move by at
    most 2 * d per position, since each one's gradient in the logits sums to at most 2 in absolute value."""
    model, _, info = tiny
    candidate = Candidate(KIVI, (KV4, K4V2, KV2, KV8))
    whole = _evaluator(tiny, windows, tmp_path).score(candidate)
    monkeypatch.setattr(evaluate, "POSITIONS_PER_STEP", 5)  # 63 scored positions: 12 steps of 5 and one of 3
    steps = _evaluator(tiny, windows, tmp_path, name="steps.jsonl").score(candidate)
    with torch.inference_mode():
        hidden = model.model(windows.calibration[:1], use_cache=False).last_hidden_state
        full = model.lm_head(hidden)
        chunked = torch.cat([model.lm_head(part) for part in hidden.split(5, dim=1)], dim=1)
    d = float((full - chunked).abs().max())
    assert abs(steps.kl - whole.kl) <= 2 * d + 1e-12 and abs(steps.nll - whole.nll) <= 2 * d + 1e-12
    assert steps.kl > 0


def test_more_bits_less_kl(tiny, windows, tmp_path):
    _, _, info = tiny
    evaluator = _evaluator(tiny, windows, tmp_path)
    kl = [s.kl for s in evaluator.score_all([Candidate(KIVI, (p,) * info.num_layers) for p in (KV8, KV4, KV2)])]
    assert 0 < kl[0] < kl[1] < kl[2]


def test_store_persists_and_is_not_recomputed(tiny, windows, tmp_path):
    _, _, info = tiny
    candidate = Candidate(KIVI, (KV4,) * info.num_layers)
    first = _evaluator(tiny, windows, tmp_path)
    scores = first.score(candidate)
    again = _evaluator(tiny, windows, tmp_path)
    assert again.score(candidate) == scores and again.computed == 0
    assert again.unquantized.ppl == pytest.approx(math.exp(first.unquantized.nll))
