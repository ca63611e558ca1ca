"""Step 6: real end-to-end scores of a map: the whole model run with every layer's cache
fake-quantized as served, against the unquantized model on the same windows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibration import simulate
from calibration.sensitivity import Reference
from kvtuner_vllm.precision_map import LayerPrecision


@dataclass(frozen=True)
class Scores:
    kl: float  # mean next-token KL(p_bf16 || p_map), nats
    nll: float  # mean next-token negative log-likelihood, nats
    ppl: float

    def as_dict(self) -> dict:
        return {"kl": self.kl, "nll": self.nll, "ppl": self.ppl}


class Evaluator:
    """Scores maps on fixed windows against the unquantized distribution, computed once and kept."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 4):
        self.model = model
        self.device = next(model.parameters()).device
        self.batches = list(windows.split(batch_size))
        with torch.inference_mode():
            logits = [self._logits(batch) for batch in self.batches]
        self.reference = [Reference(batch_logits) for batch_logits in logits]
        self.unquantized = self._scores(logits)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device), use_cache=False).logits[:, :-1].cpu()

    def _scores(self, logits: Iterable[torch.Tensor]) -> Scores:
        kl = nll = 0.0
        count = 0
        for batch, ref, out in zip(self.batches, self.reference, logits, strict=True):
            targets = batch[:, 1:]
            nll += F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            kl += ref.kl(out).sum().item()
            count += targets.numel()
        return Scores(kl / count, nll / count, math.exp(nll / count))

    def evaluate(self, layers: Sequence[LayerPrecision], group_size: int) -> Scores:
        if all((p.key_bits, p.value_bits) == (16, 16) for p in layers):
            return self.unquantized
        with simulate.quantized(self.model, list(layers), group_size), torch.inference_mode():
            return self._scores(self._logits(batch) for batch in self.batches)
