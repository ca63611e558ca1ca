"""The choice on held-out data: the map written for a budget is the one with the lowest held-out KL
among the searched front and the uniform maps within the budget, scored on windows the search never
saw. Every uniform map within the budget is in the pool unless its calibration KL is over RULE_OUT
times that of the best one (it cannot be the best uniform map then), so the chosen map is never worse
on that data than the best uniform map at <= its bits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from calibration.common import Candidate
from calibration.evaluate import Scores

RULE_OUT = 2.0  # a uniform map with this many times the calibration KL of the best uniform map is not scored


@dataclass
class Scored:
    candidate: Candidate
    calibration: Scores
    surrogate: float
    origin: str = "search"  # "seed": in the initial population (exact-front and uniform maps, their mutants)
    heldout: Scores | None = None


@dataclass
class Pool:
    front: list[Scored]  # front maps scored on held-out (the `verify` lowest calibration KL within the budget)
    uniform: list[Scored]  # uniform maps within the budget scored on held-out
    ruled_out: list[tuple[Scored, Scored]]  # (uniform map not scored, the best uniform map, which rules it out)

    @property
    def members(self) -> list[Scored]:
        return self.front + self.uniform


def build_pool(front: Sequence[Scored], uniform: Sequence[Scored], budget: float, verify: int) -> Pool:
    """The `verify` front maps with the lowest calibration KL within the budget, leaving out any with over
    RULE_OUT times the lowest calibration KL of all candidates (it cannot win), and the uniform maps within the
    budget but those with over RULE_OUT times the calibration KL of the best uniform map."""
    within = [s for s in front if s.candidate.avg_bits <= budget + 1e-9 and not s.candidate.uniform]
    candidates = [u for u in uniform if u.candidate.avg_bits <= budget + 1e-9]
    lowest = min((s.calibration.kl for s in within + candidates), default=float("inf"))
    chosen_front = [s for s in sorted(within, key=lambda s: (s.calibration.kl, s.candidate.avg_bits))[:verify]
                    if s.calibration.kl <= RULE_OUT * lowest]
    kept, ruled_out = [], []
    best = min(candidates, key=lambda v: v.calibration.kl, default=None)
    for u in candidates:
        if u.calibration.kl > RULE_OUT * best.calibration.kl:
            ruled_out.append((u, best))
        else:
            kept.append(u)
    return Pool(chosen_front, kept, ruled_out)


def choose(pool: Pool) -> Scored:
    """Lowest held-out KL; of equal ones, fewer bits."""
    return min(pool.members, key=lambda s: (s.heldout.kl, s.candidate.avg_bits))


def uniform_check(chosen: Scored, pool: Pool) -> list[tuple[Scored, bool, bool]]:
    """(uniform map at <= the chosen bits, chosen beats it on held-out KL, on held-out PPL) for each one scored."""
    return [(u, chosen.heldout.kl < u.heldout.kl, chosen.heldout.ppl < u.heldout.ppl)
            for u in pool.uniform if u.candidate.avg_bits <= chosen.candidate.avg_bits + 1e-9
            and u.candidate != chosen.candidate]
