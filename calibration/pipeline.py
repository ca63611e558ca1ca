"""The calibration run: every step in order, each cached (cache.StepCache) under the arguments
it depends on, with progress bars and a line per step saying what it did and how long it took."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from calibration import capture, clustering, data, evaluate, pruning, report, search, sensitivity
from calibration import model as model_io
from calibration.cache import StepCache, digest, file_digest
from calibration.common import CANDIDATE_PAIRS, SEARCH_PAIRS, CalibrationError, pair_bits
from calibration.options import MAX_BUDGET, Options, check_options
from kvtuner_vllm.precision_map import LayerPrecision


def cpu_threads() -> int:
    """Threads for torch on CPU: the cores other processes leave idle (1-minute load average), at least 1.

    Why: torch's OpenMP workers spin-wait at every parallel region; on oversubscribed cores a 2-thread
    forward measured 5x slower than a 1-thread one (SmolLM2, 2 shared cores, load 7).
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def _log(message: str) -> None:
    print(message, flush=True)


class Run:
    def __init__(self, opts: Options):
        check_options(opts)
        self.opts = opts
        self.out = Path(opts.out_dir)
        self.cache = StepCache(self.out)
        self.bits = [pair_bits(p) for p in SEARCH_PAIRS]

    def _timed(self, label: str, fn):
        start = time.perf_counter()
        value = fn()
        _log(f"[{label}] {time.perf_counter() - start:.1f}s")
        return value

    def run(self) -> Path:
        opts, start = self.opts, time.perf_counter()
        if opts.device == "cpu":
            torch.set_num_threads(opts.threads or cpu_threads())
            _log(f"CPU threads: {torch.get_num_threads()}")
        tokenizer, info = model_io.inspect(opts.model_dir, opts.dtype)
        model_io.check_group_size(opts.group_size, info)
        text = data.load_text(opts.text)
        split = data.split_tokens(tokenizer, text, opts.tokens, opts.heldout_tokens, opts.seq_len, opts.seed)
        model = self._timed("load model", lambda: model_io.load_model(opts.model_dir, info, opts.device))
        _log(
            f"model {info.name}: {info.num_layers} layers, {info.num_kv_heads} KV heads, head size {info.head_dim}, "
            f"{info.dtype}; {split.calibration.numel()} calibration + {split.heldout.numel()} held-out tokens"
        )
        measure_key = digest(self._model_key(), self._text_key(), opts.group_size, opts.tokens, opts.heldout_tokens,
                             opts.seq_len, opts.seed, opts.device, str(info.dtype))
        sens_windows = split.calibration[: max(1, opts.sensitivity_tokens // opts.seq_len)]

        attn = self.cache.get("attention-error", measure_key, lambda: self._timed(
            "capture + attention error", lambda: sensitivity.attention_error(
                capture.capture_qkv(model, split.calibration, opts.batch_size), SEARCH_PAIRS, opts.group_size)), _log)
        kept = pruning.prune(attn, self.bits)
        kl_key = digest(measure_key, opts.sensitivity_tokens, kept)
        kl = self.cache.get("kl-sensitivity", kl_key, lambda: self._timed(
            "KL sensitivity", lambda: self._kl_table(model, sens_windows, kept)), _log)

        labels = clustering.cluster_layers(clustering.profile_table(kl, attn), opts.groups)
        candidates = clustering.group_candidates(kl, labels, kept, self.bits)
        front = search.search(kl, self.bits, labels, candidates, opts.budget, opts.seed, opts.pop_size,
                              opts.generations)
        _log(f"[search] {len(front)} front points, {max(labels) + 1} layer groups")
        if not front:
            raise CalibrationError(f"no map fits --budget {opts.budget}")
        # The surrogate front past the budget too (seconds, no forward pass): the plot shows what more bits buy.
        whole = search.search(kl, self.bits, labels, candidates, MAX_BUDGET, opts.seed, opts.pop_size,
                              opts.generations)

        search_key = digest(kl_key, opts.groups, opts.budget, opts.pop_size, opts.generations, opts.verify)
        verified = self.cache.get("verify", search_key, lambda: self._timed(
            "verify front (calibration)", lambda: self._verify(model, split.calibration, front)), _log)
        chosen = min(verified, key=lambda v: (v["calibration"]["kl"], v["avg_bits"]))

        heldout = self._timed("held-out evaluation", lambda: self._heldout(model, split.heldout, verified, info,
                                                                         measure_key))
        result = report.Result(
            opts=asdict(opts), info=info, pairs=SEARCH_PAIRS, attention_error=attn, kl=kl, kept=kept, labels=labels,
            candidates=candidates, front=front, whole_front=whole, verified=verified, chosen=chosen, heldout=heldout,
            tokens={"calibration": split.calibration.numel(), "heldout": split.heldout.numel(),
                    "sensitivity": sens_windows.numel()},
            wall_s=time.perf_counter() - start,
        )
        report.write(result, self.out)
        _log(f"done in {time.perf_counter() - start:.0f}s: {self.out / 'precision_map.json'}")
        return self.out / "precision_map.json"

    def _model_key(self) -> list:
        folder = Path(self.opts.model_dir).resolve()
        weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
        return [str(folder), file_digest(folder / "config.json"), weights]

    def _text_key(self) -> list:
        return [file_digest(path) for path in self.opts.text] or ["pydoc_data.topics"]

    def _kl_table(self, model, windows: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
        """Single-layer KL for the pairs that survived pruning (NaN elsewhere: never searched)."""
        replay = capture.capture_replay(model, windows)
        needed = sorted({p for row in kept for p in row})
        measured = sensitivity.kl_sensitivity(model, replay, [SEARCH_PAIRS[p] for p in needed], self.opts.group_size,
                                              only=[[needed.index(p) for p in row] for row in kept])
        table = torch.full((len(kept), len(SEARCH_PAIRS)), float("nan"), dtype=torch.float64)
        table[:, needed] = measured
        return table

    def _layers(self, point: search.FrontPoint) -> list[LayerPrecision]:
        return [SEARCH_PAIRS[p] for p in point.layers]

    def _verify(self, model, windows, front: list[search.FrontPoint]) -> list[dict]:
        """Real calibration KL/PPL of the front points nearest the budget (the pick) and a spread below it."""
        chosen = _spread(front, self.opts.verify)
        evaluator = evaluate.Evaluator(model, windows, self.opts.batch_size)
        results = []
        for point in report.progress(chosen, "verify front"):
            scores = evaluator.evaluate(self._layers(point), self.opts.group_size)
            results.append({"layers": list(point.layers), "avg_bits": point.avg_bits, "surrogate": point.surrogate,
                            "calibration": scores.as_dict()})
        return results

    def _heldout(self, model, windows, verified: list[dict], info, measure_key: str) -> dict:
        """Held-out scores of bf16, every uniform candidate pair and every verified front point."""
        maps = {"unquantized": [SEARCH_PAIRS[0]] * info.num_layers}
        maps.update({p.label: [p] * info.num_layers for p in CANDIDATE_PAIRS})
        maps.update({_map_name(v["layers"]): [SEARCH_PAIRS[i] for i in v["layers"]] for v in verified})
        evaluator = None  # built on the first map not in the cache (its reference pass costs one forward)

        def score(layers: list[LayerPrecision]) -> dict:
            nonlocal evaluator
            evaluator = evaluator or evaluate.Evaluator(model, windows, self.opts.batch_size)
            bits = sum(pair_bits(p) for p in layers) / len(layers)
            return {**evaluator.evaluate(layers, self.opts.group_size).as_dict(), "avg_bits": bits}

        # One cache entry per map, so a run at another budget re-scores only its own front maps.
        keys = {name: digest(measure_key, [p.label for p in layers]) for name, layers in maps.items()}
        cached = sum(self.cache.path("heldout", key).exists() for key in keys.values())
        _log(f"[heldout] cached {cached} of {len(maps)} maps")
        return {
            name: self.cache.get("heldout", keys[name], lambda layers=layers: score(layers), lambda _: None)
            for name, layers in report.progress(list(maps.items()), "held-out evaluation")
        }


def _map_name(layers: list[int]) -> str:
    return "map:" + ",".join(SEARCH_PAIRS[i].label for i in layers)


def _spread(front: list[search.FrontPoint], count: int) -> list[search.FrontPoint]:
    """Half the picks from the top of the front (the candidates at the budget), half spread below it."""
    top = front[-max(1, count - count // 2):]
    rest = front[: len(front) - len(top)]
    step = max(1, len(rest) // max(1, count // 2))
    spread = rest[::-1][::step][: count // 2]
    return sorted(set(top) | set(spread), key=lambda p: p.avg_bits)
