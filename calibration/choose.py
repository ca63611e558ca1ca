"""The choice on selection text: the map written for a budget is the one with the lowest selection
KL among the searched front and the uniform maps within the budget, scored on windows the search
never saw. Every uniform map within the budget is in the pool unless its calibration KL is over
RULE_OUT times that of the best one (it cannot be the best uniform map then), so the chosen map is
never worse on that text than the best uniform map at <= its bits. The numbers the report gives
come from a third text (Scored.report), on which nothing is chosen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calibration.common import Candidate
from calibration.evaluate import Scores

RULE_OUT = 2.0  # a uniform map with this many times the calibration KL of the best uniform map is not scored
SEARCHED = ("seed", "search")  # Scored.origin of the maps the search evaluated


@dataclass
class Scored:
    candidate: Candidate
    calibration: Scores
    surrogate: float
    # "seed": in the initial population (exact-front and uniform maps); "search": an offspring; "baseline": a uniform
    # map scored as a candidate baseline; "bytes": a surrogate front map by bytes (the scheme comparison)
    origin: str = "search"
    selection: Scores | None = None
    report: Scores | None = None


@dataclass
class Pool:
    front: list[Scored]  # front maps scored on selection text (the `verify` lowest calibration KL within the budget)
    uniform: list[Scored]  # uniform maps within the budget scored on selection text
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
    """Lowest selection KL; of equal ones, fewer bits."""
    return min(pool.members, key=lambda s: (s.selection.kl, s.candidate.avg_bits))


def best_uniform(scored: Sequence[Scored], fits: Callable[[Candidate], bool]) -> Scored | None:
    """The uniform map that fits with the lowest selection KL (of equal ones, fewer bits): a baseline chosen the way
    the map was, on the same text."""
    uniform = [s for s in scored if s.candidate.uniform and fits(s.candidate)]
    return min(uniform, key=lambda s: (s.selection.kl, s.candidate.avg_bits), default=None)
