"""The calibration run: every step in order, the expensive ones cached (the surrogate in a step
cache, every map score in a score store), with progress bars and a line per step saying what it
did, what it removed and how long it took (wall and CPU)."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calibration import capture, choose, data, dp, pruning, report, search, sensitivity
from calibration import model as model_io
from calibration.cache import StepCache, digest, file_digest
from calibration.choose import SEARCHED, Scored
from calibration.common import (
    CANDIDATE_PAIRS,
    SEARCH_PAIRS,
    CalibrationError,
    Candidate,
    FormatOption,
    Geometry,
    format_options,
    pair_cost,
)
from calibration.evaluate import Evaluator, ScoreStore
from calibration.options import Options, check_options
from kvtuner_vllm import map_estimate

COSTS = [pair_cost(p) for p in SEARCH_PAIRS]
BASELINE_SHORTLIST = 2  # uniform maps per limit, predicted best by the surrogate, scored to find a uniform baseline


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat's first line (idle and iowait are not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def busy_cores(interval: float = 0.5) -> float:
    """Cores other processes keep busy now: the non-idle share of /proc/stat's time over `interval` seconds, in
    cores (0 where /proc/stat is missing). Sampled now rather than the 1-minute load average, which still counts
    a minute of finished work (a conversion or a build just before the run) and would cost the whole run a
    thread."""
    try:
        busy0, total0 = cpu_times()
        time.sleep(interval)
        busy1, total1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return os.cpu_count() * (busy1 - busy0) / max(1, total1 - total0)


def cpu_threads() -> int:
    """Threads for torch on CPU: the cores other processes leave idle now, at least 1.

    Why not always every core: torch's OpenMP workers spin-wait at every parallel region; on oversubscribed
    cores a 2-thread forward measured 5x slower than a 1-thread one (SmolLM2, 2 shared cores, load 7).
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, round(cores - busy_cores())))


def reuse_freed_memory() -> None:
    """Keep freed memory in the process (glibc): the served attention allocates and frees tens of MB per layer, and
    glibc's default returns each block to the OS, so every layer faulted its pages in again; this measured a third
    of the CPU time of an evaluation as kernel time (SmolLM2, 1024 tokens: 1.45 s sys of 5.3 s; 0.08 s after)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: blocks below it come from the heap ...
    libc.mallopt(m_trim_threshold, 1 << 30)  # ... which is not trimmed back to the OS after every free


def _log(message: str) -> None:
    print(message, flush=True)


class Clock:
    """Wall and CPU seconds per step, for the log and the report."""

    def __init__(self):
        self.steps: dict[str, tuple[float, float]] = {}
        self.start = (time.perf_counter(), time.process_time())

    def __call__(self, label: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        self.steps[label] = (time.perf_counter() - wall, time.process_time() - cpu)
        _log(f"[{label}] {self.steps[label][0]:.1f}s wall, {self.steps[label][1]:.1f}s CPU")
        return value

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.start[0], time.process_time() - self.start[1]


@dataclass
class Setup:
    model: torch.nn.Module
    info: model_io.ModelInfo
    options: list[FormatOption]
    split: data.TokenSplit
    calibration_key: str  # what measurements on calibration windows depend on: model, text, windows, dtype, block

    def sensitivity_windows(self, tokens: int, seq_len: int) -> torch.Tensor:
        """The surrogate's windows: the first calibration windows."""
        return self.split.calibration[: max(1, tokens // seq_len)]


class Run:
    def __init__(self, opts: Options):
        check_options(opts)
        self.opts = opts
        self.out = Path(opts.out_dir)
        self.cache_dir = Path(opts.cache_dir) if opts.cache_dir else self.out / ".cache"
        self.cache = StepCache(self.cache_dir)
        self.clock = Clock()
        self.maps: dict[str, Scored] = {}  # every map scored, by key

    def setup(self) -> Setup:
        """Threads, model, text, format options, evaluators: what every use of the measurements needs."""
        opts, clock = self.opts, self.clock
        reuse_freed_memory()
        if opts.device == "cpu":
            torch.set_num_threads(opts.threads or cpu_threads())
            _log(f"CPU threads: {torch.get_num_threads()}")
        tokenizer, info = model_io.inspect(opts.model_dir, opts.dtype, opts.matmul_dtype)
        options = format_options(info.head_dim, opts.block_size, opts.schemes, opts.group_sizes, opts.windows,
                                 opts.key_group_sizes)
        self.geometry = Geometry(info.head_dim, info.num_kv_heads, info.dtype)
        split = data.split_tokens(tokenizer, data.load_text(opts.text), opts.tokens, opts.selection_tokens,
                                  opts.report_tokens, opts.seq_len, opts.seed)
        model = clock("load model", lambda: model_io.load_model(opts.model_dir, info, opts.device))
        products = f" with {info.matmul_dtype} products" if info.matmul_dtype else ""
        _log(f"model {info.name}: {info.num_layers} layers, {info.num_kv_heads} KV heads, head size {info.head_dim}, "
             f"served in {info.dtype}, calibrated in {info.compute_dtype}{products}; "
             f"{split.calibration.numel()} calibration, "
             f"{split.selection.numel()} selection and {split.report.numel()} report tokens; {len(options)} format "
             "options")
        calibration_key = self._evaluators(model, split, info)
        return Setup(model, info, options, split, calibration_key)

    def surrogate(self, setup: Setup) -> sensitivity.Surrogate:
        opts = self.opts
        windows = setup.sensitivity_windows(opts.sensitivity_tokens, opts.seq_len)
        key = digest(setup.calibration_key, opts.sensitivity_tokens, setup.options)
        return self.cache.get("surrogate", key, lambda: self.clock(
            "surrogate", lambda: self._surrogate(setup.model, windows, setup.options)), _log)

    def run(self) -> Path:
        opts, clock = self.opts, self.clock
        setup = self.setup()
        info, options, split = setup.info, setup.options, setup.split
        surrogate = self.surrogate(setup)
        fronts = {o: dp.exact_front(surrogate.table(o), COSTS) for o in options}
        space, seeds = self._space(options, fronts, surrogate)
        front, stats = self._search(space, seeds, surrogate)
        uniform = [s for s in self.maps.values() if s.candidate.uniform]  # (the searched maps so far)
        pool = choose.build_pool(front, uniform, opts.budget, opts.verify)
        clock("selection", lambda: self._score(self.selection, pool.members, "selection"))
        chosen = choose.choose(pool)
        baselines = clock("uniform baselines", lambda: self._uniform_baselines(chosen, pool, options, surrogate))
        comparison = clock("scheme comparison", lambda: self._compare_schemes(chosen, options, space.options,
                                                                               surrogate))
        reported = [chosen, *baselines.values(), *(s for row in comparison for s in row.values()
                                                   if isinstance(s, Scored))]
        clock("report", lambda: self._score(self.report, reported, "report"))
        result = report.Result(
            opts=asdict(opts), info=info, geometry=self.geometry, options=options, kept=space.options,
            surrogate=surrogate, fronts=fronts, allowed=space.allowed, seeds=seeds, evaluated=list(self.maps.values()),
            front=front, pool=pool, chosen=chosen, baselines=baselines, comparison=comparison,
            unquantized={name: getattr(self, name).unquantized for name in data.RANGES},
            tokens={**{name: getattr(split, name).numel() for name in data.RANGES},
                    "sensitivity": setup.sensitivity_windows(opts.sensitivity_tokens, opts.seq_len).numel()},
            search_stats=stats, steps=clock.steps, total=clock.total(), threads=torch.get_num_threads(),
        )
        report.write(result, self.out)
        wall, cpu = clock.total()
        _log(f"done in {wall:.0f}s wall, {cpu:.0f}s CPU: {self.out / 'precision_map.json'} "
             f"({chosen.candidate.name}, report KL {chosen.report.kl:.5f})")
        return self.out / "precision_map.json"

    # -- steps --------------------------------------------------------------------------

    def _evaluators(self, model, split: data.TokenSplit, info: model_io.ModelInfo) -> str:
        """The calibration, selection and report evaluators, each with its score store keyed by what its windows and
        scores depend on (so another --report-tokens keeps the search's scores); returns the calibration key. The
        search and the choice multiply in --matmul-dtype; the report's numbers are measured with every product in
        the compute dtype (model.exact_products), so what it states does not depend on the fast products."""
        opts = self.opts

        def common(products: torch.dtype | None) -> str:
            return digest(map_estimate.model_key(opts.model_dir), self._text_key(), data.RANGES, opts.seq_len,
                          opts.device, str(info.compute_dtype), str(products), opts.block_size)

        fast = common(info.matmul_dtype)
        keys = {"calibration": digest(fast, opts.tokens, opts.seed), "selection": digest(fast, opts.selection_tokens),
                "report": digest(common(None), opts.report_tokens)}
        for name, key in keys.items():
            store = ScoreStore(self.cache_dir / f"scores-{name}-{key}.jsonl")
            state_bytes = opts.state_mb << (20 if name == "calibration" else 18)  # the search reuses prefixes most
            setattr(self, name, Evaluator(model, getattr(split, name), opts.block_size, opts.batch_size, store,
                                          info.compute_dtype, state_bytes, f"score maps ({name})",
                                          exact=name == "report"))
        return keys["calibration"]

    def _space(self, options, fronts: dict, surrogate) -> tuple[search.Space, list[Candidate]]:
        """Screened options, pruned pairs (a uniform seed keeps its pair on every layer) and the seeds."""
        kept = self._screen(options, fronts)
        tables = [surrogate.table(o) for o in kept]
        space = search.Space(kept, pruning.allowed_pairs(tables, COSTS), tables, self.opts.budget, self.opts.band)
        seeds = self._seeds(space, fronts)
        for seed in seeds:
            space.allowed[np.arange(len(seed.layers)), list(seed.layers)] = True
        digits = float(np.log10(space.allowed.sum(1)).sum()), space.allowed.shape[0] * np.log10(len(SEARCH_PAIRS))
        _log(f"[prune] {int(space.allowed.size - space.allowed.sum())} of {space.allowed.size} (layer, pair) choices "
             f"removed: 10^{digits[0]:.1f} instead of 10^{digits[1]:.1f} maps per option")
        return space, seeds

    def _search(self, space: search.Space, seeds: list[Candidate], surrogate):
        """(the real front, search statistics); every map the search evaluated goes to self.maps."""
        opts, before = self.opts, self.calibration.computed
        found = self.clock("search", lambda: search.search(space, seeds, self._calibration_kl, opts.pop_size,
                                                           opts.offspring, opts.generations, opts.seed))
        states = self.calibration.states
        stats = {"evaluated": len(found.evaluated), "new": self.calibration.computed - before,
                 "layers_reused": states.layers_reused, "layers_run": states.layers_run}
        _log(f"[search] {stats['evaluated']} maps evaluated ({stats['new']} new, the rest from the score store); "
             f"prefix states saved {stats['layers_reused']} of {states.layers_reused + states.layers_run} layer runs")
        for candidate, _ in found.evaluated:
            self._scored(candidate, surrogate, "seed" if candidate.key in found.initial else "search")
        return [self.maps[c.key] for c, _ in search.pareto_front(found.evaluated)], stats

    def _surrogate(self, model, windows, options) -> sensitivity.Surrogate:
        captured = capture.capture_qkv(model, windows, self.opts.block_size)
        replay = capture.capture_replay(model, windows, self.opts.block_size)
        return sensitivity.measure(model, captured, replay, options, self.opts.block_size)

    def _screen(self, options: list[FormatOption], fronts: dict) -> list[FormatOption]:
        """The options searched: the `formats` best by the exact surrogate front at the budget, plus the best
        option of every scheme (so the report can compare schemes on searched maps)."""
        max_cost = self.opts.budget * 2 * len(next(iter(fronts.values()))[0].layers)
        at_budget = {o: dp.best_within(fronts[o], max_cost).loss for o in options}
        ranked = sorted(options, key=lambda o: (at_budget[o], o))  # ties by name: the same order in every process
        kept = set(ranked[: self.opts.formats])
        for scheme in sorted({o.scheme for o in options}):
            kept.add(min((o for o in options if o.scheme == scheme), key=lambda o: at_budget[o]))
        kept = sorted(kept, key=lambda o: (at_budget[o], o))
        _log(f"[screen] {len(kept)} of {len(options)} format options kept: " + "; ".join(
            f"{o.label} {at_budget[o]:.4f}{' (kept)' if o in kept else ''}" for o in ranked))
        return kept

    def _seeds(self, space: search.Space, fronts: dict) -> list[Candidate]:
        """Uniform maps in the band (the Pareto set of each option's uniform maps by the surrogate) and exact-front
        maps at `seeds_per_format` evenly spaced bit levels of the band, per kept option."""
        num_layers, seeds = space.num_layers, []
        for index, option in enumerate(space.options):
            table = space.tables[index]
            in_band = [i for i, c in enumerate(COSTS) if space.min_cost() <= c * num_layers <= space.max_cost()]
            predicted = [table[:, i].sum() for i in in_band]
            for j in pruning.pareto_indices([COSTS[i] for i in in_band], predicted):
                seeds.append(Candidate.uniform_map(option, SEARCH_PAIRS[in_band[j]], num_layers))
            steps = np.linspace(space.max_cost(), space.min_cost(), self.opts.seeds_per_format + 1)[:-1]
            for cap in steps:
                point = dp.best_within(fronts[option], cap)
                if point is not None and point.cost >= space.min_cost():
                    seeds.append(Candidate(option, point.layers))
        return list({s.key: s for s in seeds}.values())

    def _calibration_kl(self, candidates: list[Candidate]) -> list[float]:
        return [s.kl for s in self.calibration.score_all(candidates)]

    def _scored(self, candidate: Candidate, surrogate: sensitivity.Surrogate, origin: str) -> Scored:
        """The map with its calibration score, recorded in self.maps (every map the report lists) on first sight."""
        if candidate.key not in self.maps:
            self.maps[candidate.key] = Scored(candidate, self.calibration.score(candidate),
                                              surrogate.predict(candidate.option, candidate.layers), origin)
        return self.maps[candidate.key]

    @staticmethod
    def _score(evaluator: Evaluator, members: list[Scored], text: str) -> None:
        """Score the maps on the evaluator's text and set each one's `text` scores ("selection" or "report")."""
        for member, scores in zip(members, evaluator.score_all([m.candidate for m in members]), strict=True):
            setattr(member, text, scores)

    def _uniform_baselines(self, chosen: Scored, pool: choose.Pool, options, surrogate) -> dict[str, Scored]:
        """The uniform maps the report compares the chosen map with: the best with no more average bits than it
        ("equal_bits") and the best with no more KV bytes per token ("equal_bytes": groups of 32 channels and kivi
        key parameters cost bytes the bit budget does not count). Both chosen as the map was, by selection KL, among
        the pool's uniform maps within the limit and the BASELINE_SHORTLIST uniform maps of any format option that
        the surrogate predicts best within it."""
        limit = self.geometry.bytes_per_token(chosen.candidate)
        limits = {"equal_bits": lambda c: c.avg_bits <= chosen.candidate.avg_bits + 1e-9,
                  "equal_bytes": lambda c: self.geometry.bytes_per_token(c) <= limit}
        num_layers = len(chosen.candidate.layers)
        uniform = [Candidate.uniform_map(o, p, num_layers) for o in options for p in CANDIDATE_PAIRS]
        baselines = {}
        for name, fits in limits.items():
            predicted = sorted((c for c in uniform if fits(c)), key=lambda c: surrogate.predict(c.option, c.layers))
            shortlist = [self._scored(c, surrogate, "baseline") for c in predicted[:BASELINE_SHORTLIST]]
            self._score(self.selection, shortlist, "selection")
            best = choose.best_uniform(pool.uniform + shortlist, fits)
            if best is not None:
                baselines[name] = best
        return baselines

    def _compare_schemes(self, chosen: Scored, options, kept, surrogate) -> list[dict]:
        """Per scheme, the best map at equal average bits (searched maps within the budget) and at equal bytes per
        token (searched maps, plus exact surrogate front maps by bytes of the scheme's options, which may go above
        the bit budget where the scheme's bytes allow it), by calibration KL (the report scores them)."""
        limit = self.geometry.bytes_per_token(chosen.candidate)
        searched = [s for s in self.maps.values() if s.origin in SEARCHED]
        rows = []
        for scheme in sorted({o.scheme for o in kept}):
            mine = [s for s in searched if s.candidate.option.scheme == scheme]
            at_bits = [s for s in mine if s.candidate.avg_bits <= self.opts.budget + 1e-9]
            extra = [self._scored(c, surrogate, "bytes") for c in self._byte_front_maps(scheme, options, surrogate,
                                                                                        limit)]
            at_bytes = [s for s in mine + extra if self.geometry.bytes_per_token(s.candidate) <= limit]
            row = {"scheme": scheme}
            for name, group in (("equal_bits", at_bits), ("equal_bytes", at_bytes)):
                if group:
                    row[name] = min(group, key=lambda s: (s.calibration.kl, s.candidate.avg_bits))
            rows.append(row)
        return rows

    def _byte_front_maps(self, scheme: str, options, surrogate, limit: int, count: int = 1) -> list[Candidate]:
        """The exact surrogate front by bytes of each option of the scheme, at `limit` bytes/token: the `count`
        options predicted best there, one map each."""
        found = []
        for option in (o for o in options if o.scheme == scheme):
            per_layer = [self.geometry.num_kv_heads * option.layer_format(p, self.geometry.head_size,
                                                                           self.geometry.dtype).bytes_per_token
                         for p in SEARCH_PAIRS]
            point = dp.best_within(dp.exact_front(surrogate.table(option), per_layer), limit)
            if point is not None:
                found.append((point.loss, Candidate(option, point.layers)))
        return [c for _, c in sorted(found, key=lambda item: item[0])[:count]]

    # -- cache keys -----------------------------------------------------------------

    def _text_key(self) -> list:
        return [file_digest(path) for path in self.opts.text] or ["pydoc_data.topics"]


__all__ = ["CalibrationError", "Run", "cpu_threads"]
