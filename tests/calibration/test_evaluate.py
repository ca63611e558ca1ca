import math

import pytest
import torch
import torch.nn.functional as F
from tiny_windows import BLOCK

from calibration import evaluate, simulate
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption, pair
from calibration.evaluate import Evaluator, Reference, ScoreStore

KIVI = FormatOption("kivi", 32, 16, 16)
KV16, KV8, KV4, K4V2, KV2 = (SEARCH_PAIRS.index(pair(*b)) for b in [(16, 16), (8, 8), (4, 4), (4, 2), (2, 2)])
EPS32 = torch.finfo(torch.float32).eps


def _evaluator(tiny, windows, tmp_path, state_bytes=1 << 28, name="scores.jsonl"):
    model, _, _ = tiny
    return Evaluator(model, windows.calibration, BLOCK, 1, ScoreStore(tmp_path / name), torch.float32, state_bytes)


def _per_position(tiny, windows, candidate: Candidate, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL and NLL (window after window) of the map from plain forward passes, without the evaluator but
    with its arithmetic: one window at a time (the evaluators here have batches of 1), the final norm and the
    vocabulary projection `step` positions at a time, so each value is computed exactly as the evaluator computes it
    (same operations on tensors of the same shapes) when `step` is evaluate.POSITIONS_PER_STEP."""
    model, _, info = tiny
    unquantized = Candidate(KIVI, (KV16,) * info.num_layers).layer_formats(64, torch.float32)
    kl, nll = [], []
    with torch.inference_mode():
        for window in windows.calibration.split(1):
            with simulate.served(model, unquantized, BLOCK):
                reference = Reference(model(window, use_cache=False).logits[:, :-1])
            with simulate.served(model, candidate.layer_formats(64, torch.float32), BLOCK):
                last = _last_hidden(model, window)
            targets = window[:, 1:]
            for start in range(0, targets.shape[1], step):
                positions = slice(start, min(start + step, targets.shape[1]))
                logits = model.lm_head(model.get_decoder().norm(last[:, positions]))
                kl.append(reference.kl(logits, positions).flatten())
                nll.append(F.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(), reduction="none"))
    return torch.cat(kl).double(), torch.cat(nll).double()


def _last_hidden(model, window: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output (what the final norm reads) in a plain forward pass."""
    seen = []
    handle = model.get_decoder().norm.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        model(window, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def _summation_slack(values: torch.Tensor, terms: int) -> float:
    """How far float32 summation can move the mean of `values` when they are added in float32 sums of `terms` values
    each (partial sums then added in float64): any order of adding n numbers errs by at most (n - 1) u sum|x|, with
    u = eps / 2 (Higham, Accuracy and Stability of Numerical Algorithms, 4.2); n u covers the float64 additions."""
    return terms * EPS32 / 2 * float(values.abs().sum()) / values.numel()


def test_unquantized_map_has_zero_kl(tiny, windows, tmp_path):
    """Exact by construction: the 16/16 map runs the reference's own computation, so every KL term is p * (a - a)."""
    _, _, info = tiny
    evaluator = _evaluator(tiny, windows, tmp_path)
    assert evaluator.score(Candidate(KIVI, (KV16,) * info.num_layers)).kl == 0.0
    assert evaluator.unquantized.kl == 0.0 and evaluator.unquantized.ppl > 1


def test_prefix_states_give_the_same_scores_as_full_forwards(tiny, windows, tmp_path):
    """Each position's KL and NLL from plain forward passes are the evaluator's (same operations, same shapes); the
    means differ only by the order of the float32 sums, bounded by _summation_slack (63 positions per sum)."""
    _, _, info = tiny
    evaluator = _evaluator(tiny, windows, tmp_path)
    first = Candidate(KIVI, (KV4, K4V2, KV4, KV8))
    second = Candidate(KIVI, (KV4, K4V2, KV2, KV2))  # shares layers 0-1 with `first`
    evaluator.score_all([first, second])
    assert evaluator.states.layers_reused == 2 * len(evaluator.batches)  # two layers per batch not rerun
    for candidate in (first, second):
        scores = evaluator.store[candidate.key]
        for name, values in zip(("kl", "nll"), _per_position(tiny, windows, candidate, evaluate.POSITIONS_PER_STEP)):
            slack = _summation_slack(values, windows.calibration.shape[1] - 1)
            assert abs(getattr(scores, name) - float(values.mean())) <= slack, name
    fresh = _evaluator(tiny, windows, tmp_path, state_bytes=0, name="fresh.jsonl")
    assert fresh.score(second) == evaluator.store[second.key]  # bit-identical without any reused state
    assert fresh.states.layers_reused == 0


def test_scores_do_not_depend_on_how_many_positions_are_projected_at_once(tiny, windows, tmp_path, monkeypatch):
    """Projecting 5 positions at a time instead of all 63 of a window changes two things, and the bound is their
    sum: each position's logits (matmul rounding may depend on the row count; measured here as the mean change of
    the per-position values, 0 on some CPUs) and the float32 sums (13 sums of at most 5 values per window instead of
    one of 63). A chunk of positions dropped or counted twice moves the NLL by its share of it, over 100 times the
    bound for every chunk (checked below; the first positions of a block read in full precision, so their KL is 0
    and only the NLL sees them). By experiment, skipping each window's last chunk (3 positions) moved KL by 9e-3 and
    NLL by 0.56, against bounds of 4e-7 and 5e-5."""
    candidate = Candidate(KIVI, (KV4, K4V2, KV2, KV8))
    whole = _evaluator(tiny, windows, tmp_path).score(candidate)
    monkeypatch.setattr(evaluate, "POSITIONS_PER_STEP", 5)  # 63 scored positions: 12 steps of 5 and one of 3
    steps = _evaluator(tiny, windows, tmp_path, name="steps.jsonl").score(candidate)
    per_whole, per_step = _per_position(tiny, windows, candidate, 63), _per_position(tiny, windows, candidate, 5)
    bounds = {}
    for name, a, b in zip(("kl", "nll"), per_whole, per_step, strict=True):
        bounds[name] = float((a - b).abs().mean()) + _summation_slack(a, 63) + _summation_slack(b, 5)
        assert abs(getattr(steps, name) - getattr(whole, name)) <= bounds[name], name
    smallest_chunk = min(float(chunk.sum()) for chunk in per_step[1].split(5)) / per_step[1].numel()
    assert bounds["nll"] < smallest_chunk / 100
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
