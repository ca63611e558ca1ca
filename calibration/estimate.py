"""What a hand-written precision map costs on a model, in seconds rather than a calibration's minutes:
the model run with every layer attending as served under the map (simulate.served, the calibration's
own scorer) on a short stretch of the calibration's report text, against the unquantized model.
A per-token map is measured once more with kivi keys at the same bits, the scheme calibration picks
where per-token keys lose, so the advice names a measured alternative."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from calibration import data
from calibration import model as model_io
from calibration.common import FormatOption, Geometry, pair
from calibration.evaluate import Evaluator, Scores, ScoreStore
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.precision_map import PrecisionMap

TOKENS = 512
SEQ_LEN = 256
BLOCK_SIZE = 128  # the server's default block size
# The kivi alternative: the option every calibration so far chose (key groups of 32 positions, groups of 32
# channels, a 64-position window).
KIVI = FormatOption(kvformat.KIVI, 32, 32, 64)
TEXT = "pydoc_data.topics (the calibration's report range)"


@dataclass(frozen=True)
class MapUnderTest:
    """A precision map as the calibration's Evaluator scores it (any pairs, not only the searched ones)."""

    option: FormatOption
    layers: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, pmap: PrecisionMap, option: FormatOption | None = None) -> MapUnderTest:
        option = option or FormatOption(pmap.scheme, pmap.group_size, pmap.key_group_size, pmap.residual_length)
        return cls(option, tuple((p.key_bits, p.value_bits) for p in pmap.layers))

    @cached_property
    def key(self) -> str:
        """Candidate.key's spelling, so the two share score stores."""
        return f"{self.option.label}|" + ",".join(pair(k, v).label for k, v in self.layers)

    def layer_formats(self, head_size: int, dtype: torch.dtype) -> list[kvformat.LayerFormat]:
        o = self.option
        return [kvformat.LayerFormat(k, v, head_size, o.group_size, dtype, o.scheme, o.key_group_size,
                                     o.residual_length) for k, v in self.layers]


def _row(scores: Scores, unquantized: Scores, under_test: MapUnderTest, info: model_io.ModelInfo) -> dict:
    geometry = Geometry(info.head_dim, info.num_kv_heads, info.dtype)
    return {"format": under_test.option.label, "kl": scores.kl, "ppl": scores.ppl,
            "ppl_delta_pct": 100 * (scores.ppl / unquantized.ppl - 1),
            "bytes_per_token": geometry.bytes_per_token(under_test)}


def measure(pmap: PrecisionMap, model_dir: str | Path, tokens: int = TOKENS, threads: int | None = None) -> dict:
    """{"map": row, "kivi": row or absent, "tokens", "text", "seconds", ...}; a row is {"format", "kl", "ppl",
    "ppl_delta_pct"}."""
    from calibration.pipeline import cpu_threads, reuse_freed_memory

    started = time.perf_counter()
    reuse_freed_memory()
    torch.set_num_threads(threads or cpu_threads())
    tokenizer, info = model_io.inspect(model_dir, "float32", "auto")
    pmap.check_model(info.num_layers, info.head_dim, source=str(pmap.model or "precision map"))
    windows = data.split_tokens(tokenizer, data.default_text(), SEQ_LEN, SEQ_LEN, tokens, SEQ_LEN, 0).report
    model = model_io.load_model(model_dir, info)
    evaluator = Evaluator(model, windows, BLOCK_SIZE, 2, ScoreStore(None), info.compute_dtype, state_bytes=0)
    under_test = MapUnderTest.of(pmap)
    result = {"map": _row(evaluator.score(under_test), evaluator.unquantized, under_test, info)}
    if pmap.scheme != kvformat.KIVI and info.head_dim % KIVI.group_size == 0:
        alternative = MapUnderTest.of(pmap, KIVI)
        result["kivi"] = _row(evaluator.score(alternative), evaluator.unquantized, alternative, info)
    products = f", {_name(info.matmul_dtype)} products" if info.matmul_dtype else ""
    return {**result, "tokens": int(windows[:, 1:].numel()), "text": TEXT, "model": info.name,
            "compute": _name(info.compute_dtype) + products, "seconds": time.perf_counter() - started}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
