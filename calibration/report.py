"""The outputs in OUT_DIR: precision_map.json (v2, with a `calibration` record), every evaluated
map (pareto.json, pareto.csv), pareto.png, sensitivity.png and report.md."""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calibration import dp  # noqa: E402
from calibration.choose import SEARCHED, Pool, Scored  # noqa: E402
from calibration.common import SEARCH_PAIRS, FormatOption, Geometry  # noqa: E402
from calibration.data import RANGES  # noqa: E402
from calibration.evaluate import Scores  # noqa: E402
from calibration.model import ModelInfo  # noqa: E402
from calibration.sensitivity import Surrogate  # noqa: E402
from kvtuner_vllm.precision_map import compact_ranges  # noqa: E402

METHOD = ("kvtuner-calibrate: surrogate (attention error x per-layer KL scale) -> exact front by dynamic programming "
          "-> NSGA-II (pymoo) on real forward passes (reference.simulated_attention in every layer) on calibration "
          "text -> lowest KL on selection text among the front and the uniform maps within the budget -> scores on "
          "report text (three disjoint ranges of the text)")


@dataclass
class Result:
    opts: dict
    info: ModelInfo
    geometry: Geometry
    options: list[FormatOption]
    kept: list[FormatOption]
    surrogate: Surrogate
    fronts: dict  # option -> exact surrogate front (dp.FrontPoint, cost in K + V bits)
    allowed: np.ndarray
    seeds: list
    evaluated: list[Scored]
    front: list[Scored]
    pool: Pool
    chosen: Scored
    baselines: dict  # "equal_bits" / "equal_bytes" -> the best uniform map within the chosen map's bits / bytes
    comparison: list[dict]
    unquantized: dict  # text (calibration, selection, report) -> Scores
    tokens: dict
    search_stats: dict  # evaluated, new, layers_reused, layers_run
    steps: dict  # label -> (wall s, CPU s)
    total: tuple[float, float]
    threads: int

    @property
    def num_layers(self) -> int:
        return self.info.num_layers


def write(result: Result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.chosen.candidate.precision_map(result.info.name, calibration_record(result)).save(out / "precision_map.json")
    rows = map_rows(result)
    (out / "pareto.json").write_text(json.dumps(pareto_document(result, rows), indent=1) + "\n")
    with open(out / "pareto.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_front(result, out / "pareto.png")
    plot_sensitivity(result, out / "sensitivity.png")
    (out / "report.md").write_text(markdown(result))


# -- records -----------------------------------------------------------------------------


def _delta(scores: Scores, base: Scores) -> float:
    return 100 * (scores.ppl / base.ppl - 1)


def calibration_record(result: Result) -> dict:
    chosen, opts = result.chosen, result.opts
    base = result.unquantized["report"]
    return {
        "budget": opts["budget"],
        "avg_bits": round(chosen.candidate.avg_bits, 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.geometry.costs(chosen.candidate).items()
           if k != "avg_bits"},
        "report": {"kl": chosen.report.kl, "ppl": chosen.report.ppl, "ppl_unquantized": base.ppl,
                   "ppl_delta_pct": round(_delta(chosen.report, base), 3)},
        "best_uniform_report": {name: {"map": s.candidate.name, "avg_bits": s.candidate.avg_bits,
                                       "bytes_per_token": result.geometry.bytes_per_token(s.candidate),
                                       "kl": s.report.kl, "ppl": s.report.ppl}
                                for name, s in result.baselines.items()},
        "selection_kl": chosen.selection.kl,
        "calibration_kl": chosen.calibration.kl,
        "block_size": opts["block_size"],
        "tokens": result.tokens,
        "seq_len": opts["seq_len"],
        "seed": opts["seed"],
        "compute_dtype": str(result.info.compute_dtype).removeprefix("torch."),
        "matmul_dtype": str(result.info.matmul_dtype or result.info.compute_dtype).removeprefix("torch."),
        "text": opts["text"] or ["pydoc_data.topics"],
        "text_ranges": _text_ranges(),
        "method": METHOD,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _text_ranges() -> dict[str, list[float]]:
    """Which fraction of the text each of the three texts comes from (data.RANGES)."""
    starts = list(RANGES.values()) + [1.0]
    return {name: [start, end] for name, start, end in zip(RANGES, starts, starts[1:])}


def _layers_text(scored: Scored) -> str:
    return " ".join(SEARCH_PAIRS[i].label for i in scored.candidate.layers)


def map_rows(result: Result) -> list[dict]:
    front = {s.candidate.key for s in result.front}
    pool = {s.candidate.key for s in result.pool.members}
    rows = []
    for s in sorted(result.evaluated, key=lambda s: (s.candidate.avg_bits, s.calibration.kl)):
        costs = result.geometry.costs(s.candidate)
        rows.append({
            "option": s.candidate.option.label, "uniform": s.candidate.uniform,
            "avg_bits": round(s.candidate.avg_bits, 4),
            "bytes_per_token": costs["bytes_per_token"], "capacity": round(costs["capacity_vs_unquantized"], 3),
            "ring_bytes_per_request": costs["ring_bytes_per_request"], "surrogate_kl": s.surrogate,
            "calibration_kl": s.calibration.kl, "calibration_ppl": s.calibration.ppl,
            **_scores(s.selection, "selection"), **_scores(s.report, "report"),
            "origin": s.origin, "on_front": s.candidate.key in front, "selection_pool": s.candidate.key in pool,
            "chosen": s.candidate == result.chosen.candidate, "layers": _layers_text(s),
        })
    return rows


def _scores(scores: Scores | None, text: str) -> dict:
    return {f"{text}_kl": scores.kl if scores else None, f"{text}_ppl": scores.ppl if scores else None}


def pareto_document(result: Result, rows: list[dict]) -> dict:
    return {
        "budget": result.opts["budget"],
        "unquantized": {split: scores.as_dict() for split, scores in result.unquantized.items()},
        "chosen": result.chosen.candidate.key,
        "best_uniform": {name: s.candidate.key for name, s in result.baselines.items()},
        "evaluated": rows,
        "exact_surrogate_fronts": {o.label: [{"avg_bits": p.cost / (2 * result.num_layers), "surrogate_kl": p.loss}
                                             for p in result.fronts[o]] for o in result.kept},
        "format_screen": {o.label: _at_budget(result, o) for o in result.options},
        "kept_formats": [o.label for o in result.kept],
        "steps": {label: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for label, (w, c) in result.steps.items()},
    }


def _at_budget(result: Result, option: FormatOption) -> float:
    point = dp.best_within(result.fronts[option], result.opts["budget"] * 2 * result.num_layers)
    return point.loss


# -- plots ---------------------------------------------------------------------------------


def plot_front(result: Result, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {o: f"C{i}" for i, o in enumerate(result.kept)}
    low = result.opts["budget"] - 2 * result.opts["band"]
    for option in result.kept:
        points = [p for p in result.fronts[option] if low <= p.cost / (2 * result.num_layers) <= 8]
        ax.plot([p.cost / (2 * result.num_layers) for p in points], [p.loss for p in points], "-", lw=0.8,
                color=colors[option], alpha=0.5, label=f"exact surrogate front, {option.label}")
    for option in result.kept:
        mine = [s for s in result.evaluated if s.candidate.option == option]
        ax.plot([s.candidate.avg_bits for s in mine], [s.calibration.kl for s in mine], ".", color=colors[option],
                alpha=0.6)
    ax.plot([s.candidate.avg_bits for s in result.front], [s.calibration.kl for s in result.front], "-", color="0.2",
            lw=1.2, label="front of real calibration KL (dots: every evaluated map)")
    pool = result.pool.members
    ax.plot([s.candidate.avg_bits for s in pool], [s.selection.kl for s in pool], "o", mfc="none", color="0.2",
            label="selection KL of the pool")
    for u in result.pool.uniform:
        ax.plot(u.candidate.avg_bits, u.selection.kl, "s", color=colors.get(u.candidate.option, "0.5"))
    ax.plot([], [], "s", color="0.5", label="uniform maps, selection KL")
    chosen = result.chosen
    ax.plot(chosen.candidate.avg_bits, chosen.selection.kl, "*", color="C3", markersize=16,
            label=f"chosen: {chosen.candidate.name}")
    reported = [chosen, *result.baselines.values()]
    ax.plot([s.candidate.avg_bits for s in reported], [s.report.kl for s in reported], "x", color="C3",
            markersize=9, label="report KL: chosen map and best uniform maps at <= its bits and bytes")
    ax.axvline(result.opts["budget"], color="0.3", linestyle=":", label=f"budget {result.opts['budget']:g}")
    ax.set_yscale("log")
    shown = [s.calibration.kl for s in result.evaluated] + [s.selection.kl for s in pool] + [
        s.report.kl for s in reported]
    ax.set_ylim(min(shown) / 3, max(shown) * 3)
    ax.set_xlim(low, result.opts["budget"] + 2)
    ax.set_xlabel("average code bits ((K + V) / 2 over layers)")
    ax.set_ylabel("mean next-token KL vs unquantized (nats)")
    ax.set_title(f"{result.info.name}: KV maps, budget {result.opts['budget']:g}")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sensitivity(result: Result, path: Path) -> None:
    """Predicted single-layer KL (log10) under the chosen option; pruned pairs blank, chosen pair outlined."""
    option = result.chosen.candidate.option
    pairs = list(range(1, len(SEARCH_PAIRS)))  # KV16 is the zero reference
    table = np.log10(np.clip(result.surrogate.table(option)[:, pairs], 1e-9, None))
    table = np.where(result.allowed[:, pairs], table, np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(pairs), 1.5 + 0.22 * result.num_layers))
    image = ax.imshow(table, aspect="auto", cmap="magma_r")
    fig.colorbar(image, ax=ax, label="log10 predicted KL (one layer quantized)")
    ax.set_xticks(range(len(pairs)), [SEARCH_PAIRS[i].label for i in pairs], rotation=45)
    ax.set_yticks(range(result.num_layers), [str(i) for i in range(result.num_layers)], fontsize=7)
    for layer, choice in enumerate(result.chosen.candidate.layers):
        if choice in pairs:
            ax.add_patch(plt.Rectangle((pairs.index(choice) - 0.5, layer - 0.5), 1, 1, fill=False, color="C2", lw=2))
    ax.set_xlabel("pair (blank: pruned)")
    ax.set_ylabel("layer")
    ax.set_title(f"Surrogate sensitivity, {option.label}\n(chosen pair outlined)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report.md ------------------------------------------------------------------------------


def _costs_cells(result: Result, s: Scored) -> str:
    costs = result.geometry.costs(s.candidate)
    return f"{s.candidate.avg_bits:.3f} | {costs['bytes_per_token']} | {costs['capacity_vs_unquantized']:.2f}x"


def _pool_row(result: Result, name: str, s: Scored) -> str:
    return (f"| {name} | {_costs_cells(result, s)} | {s.calibration.kl:.5f} | {s.selection.kl:.5f} | "
            f"{_delta(s.selection, result.unquantized['selection']):+.2f}% |")


def _report_row(result: Result, name: str, s: Scored) -> str:
    return (f"| {name} | {s.candidate.name} | {_costs_cells(result, s)} | {s.report.kl:.5f} | {s.report.ppl:.3f} | "
            f"{_delta(s.report, result.unquantized['report']):+.2f}% |")


def _baselines(result: Result) -> list[tuple[str, Scored]]:
    """(what it is, map) per distinct baseline map: one row when the best at equal bits is also the best at equal
    bytes."""
    names: dict[str, list[str]] = {}
    for name, s in result.baselines.items():
        names.setdefault(s.candidate.key, []).append(name)
    maps = {s.candidate.key: s for s in result.baselines.values()}
    units = {"equal_bits": "bits", "equal_bytes": "bytes/token"}
    return [(f"best uniform map with <= its {' and '.join(units[n] for n in group)}", maps[key])
            for key, group in names.items()]


def _report_lines(result: Result) -> list[str]:
    """The table users read: the chosen map and the uniform baselines on the report text."""
    base, chosen = result.unquantized["report"], result.chosen
    lines = ["| | map | avg bits | KV bytes/token | capacity | KL | PPL | PPL vs unquantized |",
             "|---|---|---|---|---|---|---|---|",
             f"| unquantized | - | 16 | {result.geometry.unquantized_bytes_per_token(result.num_layers)} | 1.00x | 0 | "
             f"{base.ppl:.3f} | +0.00% |",
             _report_row(result, "**chosen**", chosen)]
    lines += [_report_row(result, label, s) for label, s in _baselines(result)]
    lines.append("")
    for label, s in _baselines(result):
        kl, ppl = chosen.report.kl < s.report.kl, chosen.report.ppl < s.report.ppl
        lines.append(f"- vs the {label} ({s.candidate.name}): {'beats' if kl else 'does NOT beat'} it on KL "
                     f"({s.report.kl / chosen.report.kl:.2f}x), {'beats' if ppl else 'does NOT beat'} it on PPL.")
    return lines


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def _comparison_lines(result: Result) -> list[str]:
    lines = ["| scheme | at equal bits (<= budget) | report KL | at equal bytes/token (<= chosen's) | report KL |",
             "|---|---|---|---|---|"]
    for row in result.comparison:
        cells = []
        for name in ("equal_bits", "equal_bytes"):
            s = row.get(name)
            cells += ([f"{s.candidate.name}, {s.candidate.avg_bits:.2f} bits, "
                       f"{result.geometry.bytes_per_token(s.candidate)} B/token", f"{s.report.kl:.5f}"]
                      if s else ["-", "-"])
        lines.append(f"| {row['scheme']} | " + " | ".join(cells) + " |")
    for name, words in (("equal_bits", "equal bits"), ("equal_bytes", "equal bytes")):
        ranked = sorted((r[name] for r in result.comparison if name in r), key=lambda s: s.report.kl)
        if len(ranked) > 1:
            best, runner_up = ranked[0], ranked[1]
            lines.append(f"\nAt {words}: **{best.candidate.option.scheme}** wins, report KL {best.report.kl:.5f} vs "
                         f"{runner_up.report.kl:.5f} ({runner_up.report.kl / best.report.kl:.2f}x) for "
                         f"{runner_up.candidate.option.scheme}.")
    return lines


def _option_lines(result: Result) -> list[str]:
    """Every format option: the exact surrogate front's KL at the budget (what screening ranks) and, for the options
    searched, the best searched map within the budget and the best uniform map, on calibration text."""
    budget = result.opts["budget"] + 1e-9
    lines = ["| option | predicted KL at the budget | searched | best searched map (<= budget) | calibration KL | "
             "best uniform map | calibration KL |", "|---|---|---|---|---|---|---|"]
    for option in sorted(result.options, key=lambda o: _at_budget(result, o)):
        cells = [option.label, f"{_at_budget(result, option):.5f}", "yes" if option in result.kept else "no"]
        mine = [s for s in result.evaluated if s.candidate.option == option and s.candidate.avg_bits <= budget
                and s.origin in SEARCHED]
        if mine:
            best = min(mine, key=lambda s: s.calibration.kl)
            uniform = min((s for s in mine if s.candidate.uniform), key=lambda s: s.calibration.kl, default=None)
            cells += [f"{best.candidate.avg_bits:.3f} bits, {result.geometry.bytes_per_token(best.candidate)} B/token",
                      f"{best.calibration.kl:.5f}"]
            cells += [uniform.candidate.pairs[0].label, f"{uniform.calibration.kl:.5f}"] if uniform else ["-", "-"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _stage_lines(result: Result) -> list[str]:
    opts = result.opts
    removed = int(result.allowed.size - result.allowed.sum())
    stats = result.search_stats
    lines = [
        f"- **Format options**: {len(result.options)} valid combinations of scheme {opts['schemes']}, group size "
        f"{opts['group_sizes']}, window {opts['windows']}, kivi key group {opts['key_group_sizes']} (block size "
        f"{opts['block_size']}); screening on the exact surrogate front at the budget kept {len(result.kept)} (the "
        f"{opts['formats']} best and the best of each scheme; table above).",
        f"- **Pruning**: {removed} of {result.allowed.size} (layer, pair) choices are dominated on every kept option's "
        f"surrogate and never proposed by the search.",
        f"- **Seeds**: {len(result.seeds)} maps (uniform maps in the band and exact-front maps of each kept option) "
        f"start the search.",
        f"- **Search**: {stats['evaluated']} maps evaluated for real on {result.tokens['calibration']} calibration "
        f"tokens (population {opts['pop_size']}, {opts['offspring']} offspring per generation, "
        f"{opts['generations']} generations, band "
        f"[{opts['budget'] - opts['band']:g}, {opts['budget']:g}] bits), {stats['new']} computed in this run, the rest "
        f"read from the score store. Of the {len(result.front)} maps on the front, "
        f"{sum(s.origin == 'search' for s in result.front)} come from the search's offspring and "
        f"{sum(s.origin == 'seed' for s in result.front)} from the initial population; the chosen map from "
        f"{'the offspring' if result.chosen.origin == 'search' else 'the initial population'}. Prefix states saved "
        f"{stats['layers_reused']} of {stats['layers_reused'] + stats['layers_run']} layer runs.",
        f"- **Selection pool**: {len(result.pool.front)} front maps (lowest calibration KL) and "
        f"{len(result.pool.uniform)} uniform maps scored on {result.tokens['selection']} selection tokens; "
        f"{len(result.pool.ruled_out)} uniform maps not scored (calibration KL over 2x that of the best uniform map "
        "within the budget): " + (", ".join(f"{u.candidate.name} ({u.calibration.kl:.4f} vs {b.calibration.kl:.4f})"
                                  for u, b in result.pool.ruled_out) or "none") + ".",
    ]
    surrogate = [s.surrogate for s in result.evaluated]
    real = [s.calibration.kl for s in result.evaluated]
    ratio = float(np.median(np.divide(real, surrogate)))
    lines.append(f"- **Surrogate vs real**: Spearman rank correlation {_spearman(surrogate, real):.2f} over the "
                 f"{len(real)} evaluated maps; median real/predicted KL {ratio:.2f}.")
    return lines


def _products(info) -> str:
    if info.matmul_dtype is None:
        return ""
    return (f" (the search and the choice with the decoder layers' matrix products in "
            f"{str(info.matmul_dtype).removeprefix('torch.')}; the report's numbers with every product in "
            f"{str(info.compute_dtype).removeprefix('torch.')})")


def _text_line(result: Result) -> str:
    opts, tokens = result.opts, result.tokens
    source = ", ".join(opts["text"]) or "pydoc_data.topics (offline default)"
    ranges = ", ".join(f"{name} {100 * a:.0f}-{100 * b:.0f}%" for name, (a, b) in _text_ranges().items())
    return (f"Text: {source}, cut into three disjoint ranges ({ranges} of its characters): {tokens['calibration']} "
            f"calibration tokens (seeded windows of {opts['seq_len']}; {tokens['sensitivity']} for the surrogate) for "
            f"the search, {tokens['selection']} selection tokens for the choice, {tokens['report']} report tokens for "
            f"the numbers below; seed {opts['seed']}.")


def markdown(result: Result) -> str:
    info, opts, chosen = result.info, result.opts, result.chosen
    base = result.unquantized["selection"]
    pool = sorted(result.pool.members, key=lambda s: (-s.candidate.avg_bits, s.selection.kl))
    rows = [f"| unquantized | 16 | {result.geometry.unquantized_bytes_per_token(result.num_layers)} | 1.00x | 0 | 0 | "
            f"+0.00% (PPL {base.ppl:.3f}) |"]
    rows += [_pool_row(result, ("**chosen** " if s is chosen else "") + s.candidate.name, s) for s in pool]
    chosen_map = chosen.candidate.precision_map(info.name)
    layout = "\n".join(f"| {p.label} | {len(ls)} | {compact_ranges(ls)} |" for p, ls in chosen_map.pairs().items())
    steps = "\n".join(f"| {label} | {w:.1f} | {c:.1f} |" for label, (w, c) in result.steps.items())
    wall, cpu = result.total
    return f"""# KV precision calibration: {info.name}

- Budget {opts['budget']:g} average code bits; served in {str(info.dtype).removeprefix('torch.')} with block size \
{opts['block_size']}; forward passes in {str(info.compute_dtype).removeprefix('torch.')}{_products(info)}.
- {_text_line(result)}
- Time: {wall:.0f} s wall, {cpu:.0f} s CPU, {result.threads} torch thread(s).

Every score runs the whole model with every layer's attention replaced by
`kvtuner_vllm.reference.simulated_attention` (what the server computes, prefill included), against
the same model unquantized. KL: mean next-token KL(unquantized || map) in nats.

## Results on the report text

**{chosen.candidate.name}**, {result.geometry.bytes_per_token(chosen.candidate)} KV bytes/token \
({result.geometry.capacity(chosen.candidate):.2f}x the tokens of the unquantized cache), window rings \
{result.geometry.ring_bytes(chosen.candidate):,} bytes per running request, against the best uniform maps with no \
more bits and no more bytes per token (chosen like the map, on the selection text, among the uniform maps of \
every format option). Nothing is chosen on the report text: its {result.tokens['report']} tokens \
score each map listed here once.

{chr(10).join(_report_lines(result))}

```
{chosen_map.summary(info.head_dim, info.num_kv_heads, info.dtype)}
```

| pair | layers | which |
|---|---|---|
{layout}

## The choice (selection text)

The map written is the one with the lowest selection KL among the front maps and the uniform maps
within the budget, so on the selection text it beats every uniform map in the pool with <= its bits;
perplexity moves by a few tenths of a percent between maps of nearly equal KL on
{result.tokens['selection']} tokens, so the choice is on KL, the search's objective.

| map | avg bits | KV bytes/token | capacity | calibration KL | selection KL | selection PPL vs unquantized |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Schemes compared (report text)

The budget counts code bits as KVTuner does, but groups of 32 channels and kivi's per-channel key
parameters cost bytes: so schemes are compared both at equal average bits and at equal KV bytes
per token (at equal bytes a scheme with cheaper parameters may spend more code bits). Per scheme,
the map with the lowest calibration KL in each column.

{chr(10).join(_comparison_lines(result))}

Every format option (scheme, group G, kivi key group Gt, window R): predicted by the surrogate, and
measured on calibration text for the options searched:

{chr(10).join(_option_lines(result))}

## What each stage did

{chr(10).join(_stage_lines(result))}

| step | wall s | CPU s |
|---|---|---|
{steps}

Every evaluated map (bits, bytes/token, capacity, window ring, surrogate, calibration, selection
and report scores where measured) is in pareto.json / pareto.csv; plots: pareto.png, sensitivity.png.
"""
