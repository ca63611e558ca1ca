"""Real end-to-end scores of a map: the whole model run with every layer attending as served
(simulate.served), against the unquantized reference on the same windows.

Evaluations are the search's unit of cost, so two things make them cheap:
- every score is stored (ScoreStore, one JSON line per map) and never computed twice, across
  runs, budgets and restarts;
- the hidden state after each layer is kept per map *prefix* (the option and the pairs of
  layers 0..j) in a bounded LRU: a map that shares its first j layers with one scored before
  reruns only layers j+1.., which is exactly the same computation as a full forward.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibration import capture, simulate
from calibration import model as model_io
from calibration.common import Candidate

POSITIONS_PER_STEP = 64  # logits of 64 positions x 2 windows x 50k tokens: under glibc's 32 MB mmap threshold


@dataclass(frozen=True)
class Scores:
    kl: float  # mean next-token KL(p_unquantized || p_map), nats
    nll: float  # mean next-token negative log-likelihood, nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict:
        return {"kl": self.kl, "nll": self.nll, "ppl": self.ppl}


class Reference:
    """The unquantized next-token distribution, kept as log-probabilities [batch, positions, vocab].

    KL is summed as p_ref * (log p_ref - log p) term by term: the two logs are close where the map is good,
    and their difference keeps its precision, where entropy minus cross-entropy (two sums of ~10 nats each)
    would lose the small KL of a good map to float32 rounding."""

    def __init__(self, logits: torch.Tensor):
        self.log_probs = F.log_softmax(logits.float(), dim=-1)

    def kl(self, logits: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """Per-position KL(p_ref || p) over the vocabulary, float32 [batch, positions]; `logits` are those of the
        reference's `positions` (a slice of its position axis)."""
        reference = self.log_probs[:, positions]
        return (reference.exp() * (reference - F.log_softmax(logits.float(), dim=-1))).sum(-1)


class ScoreStore:
    """Scores by map key in a JSON-lines file: appended one line per new score (a kill loses at most
    the map being scored), read back whole on start. No file (path None): kept in memory only."""

    UNQUANTIZED = "unquantized"

    def __init__(self, path: Path | None):
        self.path = path
        self.scores: dict[str, Scores] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.scores[record["key"]] = Scores(record["kl"], record["nll"])

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> Scores:
        return self.scores[key]

    def add(self, key: str, scores: Scores) -> None:
        self.scores[key] = scores
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"key": key, **asdict(scores)}) + "\n")


class PrefixStates:
    """LRU of hidden states [batch, tokens, hidden] after layer j, keyed by (batch, option, pairs[:j+1])."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.states: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.layers_reused = 0
        self.layers_run = 0

    def longest(self, batch: int, candidate: Candidate) -> tuple[int, torch.Tensor | None]:
        """(number of leading layers whose output is known, the output of the last of them)."""
        for count in range(len(candidate.layers), 0, -1):
            key = (batch, candidate.option, candidate.layers[:count])
            if key in self.states:
                self.states.move_to_end(key)
                return count, self.states[key]
        return 0, None

    def put(self, batch: int, candidate: Candidate, layer: int, hidden: torch.Tensor) -> None:
        key = (batch, candidate.option, candidate.layers[: layer + 1])
        if key in self.states or hidden.numel() * hidden.element_size() > self.max_bytes:
            return
        self.states[key] = hidden
        self.bytes += hidden.numel() * hidden.element_size()
        while self.bytes > self.max_bytes:
            _, dropped = self.states.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


class Evaluator:
    """Scores maps on fixed windows against the unquantized reference (computed on first need). `exact`: with the
    model's products in its compute dtype (model.exact_products), for numbers a report states."""

    def __init__(self, model, windows: torch.Tensor, block_size: int, batch_size: int, store: ScoreStore,
                 dtype: torch.dtype, state_bytes: int = 1 << 30, desc: str = "score maps", exact: bool = False):
        self.model, self.block_size, self.store, self.dtype, self.desc = model, block_size, store, dtype, desc
        self.exact = exact
        self.batches = list(windows.split(batch_size))
        self.tokens = int(windows[:, 1:].numel())
        self.states = PrefixStates(state_bytes)
        self._replays: list[capture.Replay] | None = None
        self._references: list[Reference] = []
        self.computed = 0

    def _products(self):
        return model_io.exact_products(self.model) if self.exact else contextlib.nullcontext()

    def _prepare(self) -> None:
        """The reference pass: each batch's layer inputs (to start from layer 0) and its distribution."""
        if self._replays is not None:
            return
        with self._products():
            self._reference_pass()

    def _reference_pass(self) -> None:
        self._replays = [capture.capture_replay(self.model, batch, self.block_size) for batch in self.batches]
        hidden = []
        with simulate.served(self.model, capture.unquantized_formats(self.model), self.block_size), \
                torch.inference_mode():
            for replay in self._replays:
                hidden.append(replay.run(self.model, replay.inputs[0], 0, len(replay.inputs)))
                self._references.append(Reference(replay.logits(self.model, hidden[-1])[:, :-1]))
            if ScoreStore.UNQUANTIZED not in self.store:
                self.store.add(ScoreStore.UNQUANTIZED, self._score(hidden))

    @property
    def unquantized(self) -> Scores:
        if ScoreStore.UNQUANTIZED not in self.store:
            self._prepare()
        return self.store[ScoreStore.UNQUANTIZED]

    def _score(self, hidden: Sequence[torch.Tensor]) -> Scores:
        """Mean KL and NLL from each batch's last hidden state, the vocabulary projected POSITIONS_PER_STEP
        positions at a time: same numbers, but no logits tensor of hundreds of MB allocated per evaluation."""
        kl = nll = 0.0
        for batch, replay, reference, last in zip(self.batches, self._replays, self._references, hidden, strict=True):
            targets = batch[:, 1:].to(last.device)
            for start in range(0, targets.shape[1], POSITIONS_PER_STEP):
                positions = slice(start, min(start + POSITIONS_PER_STEP, targets.shape[1]))
                logits = replay.logits(self.model, last[:, positions]).float()
                nll += F.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(), reduction="sum").item()
                kl += reference.kl(logits, positions).sum().item()
        return Scores(kl / self.tokens, nll / self.tokens)

    def _last_hidden(self, index: int, candidate: Candidate, formats) -> torch.Tensor:
        replay = self._replays[index]
        done, hidden = self.states.longest(index, candidate)
        hidden = replay.inputs[0] if hidden is None else hidden
        self.states.layers_reused += done
        self.states.layers_run += len(formats) - done
        with simulate.served(self.model, formats, self.block_size):
            return replay.run(self.model, hidden, done, len(formats),
                              keep=lambda layer, out: self.states.put(index, candidate, layer, out))

    def score(self, candidate: Candidate) -> Scores:
        if candidate.key not in self.store:
            self._prepare()
            head_size = simulate.attention_modules(self.model)[0].head_dim
            formats = candidate.layer_formats(head_size, self.dtype)
            with torch.inference_mode(), self._products():
                hidden = [self._last_hidden(i, candidate, formats) for i in range(len(self.batches))]
                self.store.add(candidate.key, self._score(hidden))
            self.computed += 1
        return self.store[candidate.key]

    def score_all(self, candidates: Sequence[Candidate]) -> list[Scores]:
        """Scores in the given order; new maps are computed in (option, pairs) order so neighbours share prefixes."""
        todo = sorted({c.key: c for c in candidates if c.key not in self.store}.values(),
                      key=lambda c: (c.option, c.layers))
        for candidate in tqdm(todo, desc=self.desc, unit="map", leave=False, disable=not todo):
            self.score(candidate)
        return [self.store[c.key] for c in candidates]
