"""Step 7: the outputs in OUT_DIR: precision_map.json (v1, with a `calibration` record), the
Pareto front (pareto.json, pareto.csv, pareto.png), sensitivity.png and report.md."""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from calibration.common import CANDIDATE_PAIRS, pair, pair_bits  # noqa: E402
from calibration.model import ModelInfo  # noqa: E402
from calibration.search import FrontPoint  # noqa: E402
from kvtuner_vllm.precision_map import LayerPrecision, PrecisionMap, compact_ranges  # noqa: E402

OBJECTIVE = "min mean next-token KL vs the unquantized model s.t. average bits <= budget (NSGA-II, pymoo)"


def progress(items: Sequence, desc: str):
    return tqdm(items, desc=desc, unit="map", leave=False)


@dataclass
class Result:
    opts: dict
    info: ModelInfo
    pairs: Sequence[LayerPrecision]
    attention_error: torch.Tensor
    kl: torch.Tensor
    kept: list[list[int]]
    labels: list[int]
    candidates: list[list[int]]
    front: list[FrontPoint]
    whole_front: list[FrontPoint]  # the same search without the budget constraint (surrogate only)
    verified: list[dict]
    chosen: dict
    heldout: dict
    tokens: dict
    wall_s: float

    @property
    def chosen_layers(self) -> list[LayerPrecision]:
        return [self.pairs[i] for i in self.chosen["layers"]]

    @property
    def chosen_name(self) -> str:
        return "map:" + ",".join(p.label for p in self.chosen_layers)


def write(result: Result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    precision_map(result).save(out / "precision_map.json")
    write_front(result, out)
    plot_front(result, out / "pareto.png")
    plot_sensitivity(result, out / "sensitivity.png")
    (out / "report.md").write_text(markdown(result))


def precision_map(result: Result) -> PrecisionMap:
    heldout = result.heldout[result.chosen_name]
    base = result.heldout["unquantized"]
    opts = result.opts
    calibration = {
        "avg_bits": round(result.chosen["avg_bits"], 4),
        "budget": opts["budget"],
        "objective": OBJECTIVE,
        "loss": heldout["kl"],
        "heldout": {"kl": heldout["kl"], "ppl": heldout["ppl"], "ppl_unquantized": base["ppl"]},
        "calibration_kl": result.chosen["calibration"]["kl"],
        "tokens": result.tokens,
        "seed": opts["seed"],
        "groups": max(result.labels) + 1,
        "dtype": str(result.info.dtype).removeprefix("torch."),
        "text": opts["text"] or ["pydoc_data.topics"],
        "method": "kvtuner-calibrate: attention-error pruning, Ward clustering, NSGA-II on summed single-layer KL",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return PrecisionMap(model=result.info.name, num_layers=result.info.num_layers, group_size=opts["group_size"],
                        layers=result.chosen_layers, calibration=calibration)


def _front_rows(result: Result) -> list[dict]:
    verified = {tuple(v["layers"]): v for v in result.verified}
    rows = []
    for point in result.front:
        row = {"avg_bits": point.avg_bits, "surrogate_kl": point.surrogate,
               "layers": " ".join(result.pairs[i].label for i in point.layers)}
        if point.layers in verified:
            name = "map:" + ",".join(result.pairs[i].label for i in point.layers)
            calib, held = verified[point.layers]["calibration"], result.heldout[name]
            row.update(calibration_kl=calib["kl"], calibration_ppl=calib["ppl"], heldout_kl=held["kl"],
                       heldout_ppl=held["ppl"], chosen=list(point.layers) == result.chosen["layers"])
        rows.append(row)
    return rows


def write_front(result: Result, out: Path) -> None:
    rows = _front_rows(result)
    whole = [{"avg_bits": p.avg_bits, "surrogate_kl": p.surrogate} for p in result.whole_front]
    document = {"budget": result.opts["budget"], "front": rows, "surrogate_front_any_budget": whole}
    (out / "pareto.json").write_text(json.dumps(document, indent=2) + "\n")
    fields = ["avg_bits", "surrogate_kl", "calibration_kl", "calibration_ppl", "heldout_kl", "heldout_ppl", "chosen",
              "layers"]
    with open(out / "pareto.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_front(result: Result, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    beyond = [p for p in result.whole_front if result.opts["budget"] < p.avg_bits <= 8]
    ax.plot([p.avg_bits for p in beyond], [p.surrogate for p in beyond], ".--", color="0.8",
            label="surrogate front past the budget (not searched further)")
    front = result.front
    ax.plot([p.avg_bits for p in front], [p.surrogate for p in front], ".-", color="0.6",
            label="NSGA-II front (surrogate: summed single-layer KL, calibration)")
    verified = result.verified
    names = ["map:" + ",".join(result.pairs[i].label for i in v["layers"]) for v in verified]
    ax.plot([v["avg_bits"] for v in verified], [result.heldout[n]["kl"] for n in names], "o", color="C0",
            label="front maps, held-out KL")
    for p in CANDIDATE_PAIRS:
        score = result.heldout[p.label]
        ax.plot(score["avg_bits"], score["kl"], "s", color="C3")
        ax.annotate(p.label, (score["avg_bits"], score["kl"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.plot([], [], "s", color="C3", label="uniform pairs, held-out KL")
    chosen = result.heldout[result.chosen_name]
    ax.plot(chosen["avg_bits"], chosen["kl"], "*", color="C2", markersize=16, label="chosen map, held-out KL")
    ax.axvline(result.opts["budget"], color="0.3", linestyle=":", label=f"budget {result.opts['budget']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("average KV bits ((K + V) / 2 over layers)")
    ax.set_ylabel("mean next-token KL vs unquantized (nats)")
    ax.set_title(f"{result.info.name}: KV precision vs loss (group size {result.opts['group_size']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sensitivity(result: Result, path: Path) -> None:
    """Heatmap of single-layer KL (log10), pruned pairs blank, chosen pair outlined."""
    pairs = list(range(1, len(result.pairs)))  # KV16 is the zero reference
    table = torch.log10(result.kl[:, pairs].clamp(min=1e-9)).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(pairs), 1.5 + 0.22 * len(result.kl)))
    image = ax.imshow(table, aspect="auto", cmap="magma_r")
    fig.colorbar(image, ax=ax, label="log10 KL (one layer quantized)")
    ax.set_xticks(range(len(pairs)), [result.pairs[i].label for i in pairs], rotation=45)
    ax.set_yticks(range(len(result.kl)), [f"{i} (g{g})" for i, g in enumerate(result.labels)], fontsize=7)
    for layer, choice in enumerate(result.chosen["layers"]):
        if choice in pairs:
            ax.add_patch(plt.Rectangle((pairs.index(choice) - 0.5, layer - 0.5), 1, 1, fill=False, color="C2", lw=2))
    ax.set_xlabel("pair (blank: pruned, dominated on attention error)")
    ax.set_ylabel("layer (cluster group)")
    ax.set_title("Per-layer sensitivity (chosen pair outlined)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, score: dict, base: dict) -> str:
    delta = 100 * (score["ppl"] / base["ppl"] - 1)
    return f"| {name} | {score['avg_bits']:.2f} | {score['kl']:.5f} | {score['ppl']:.3f} | {delta:+.2f}% |"


def target_check(result: Result) -> list[str]:
    """The issue's targets, checked on held-out numbers."""
    chosen = result.heldout[result.chosen_name]
    base = result.heldout["unquantized"]
    lines = []
    for p in CANDIDATE_PAIRS:
        score = result.heldout[p.label]
        if score["avg_bits"] >= chosen["avg_bits"]:
            beats = chosen["kl"] < score["kl"] and chosen["ppl"] < score["ppl"]
            lines.append(f"- vs uniform {p.label} ({score['avg_bits']:g} bits): "
                         f"{'beats it' if beats else 'does NOT beat it'} on held-out KL and PPL")
    within = chosen["ppl"] <= 1.01 * base["ppl"]
    lines.append(f"- held-out PPL {chosen['ppl']:.3f} vs unquantized {base['ppl']:.3f}: "
                 f"{'within' if within else 'NOT within'} 1%")
    return lines


def diagnosis(result: Result) -> list[str]:
    """Facts from this run that bound what any map under the budget can reach (for when a target is missed)."""
    lines = []
    k4v8, k8v4 = result.heldout["K4V8"], result.heldout["K8V4"]
    keys_dominate = k4v8["kl"] > k8v4["kl"]
    side, other = ("keys", "values") if keys_dominate else ("values", "keys")
    lines.append(
        f"- {side.capitalize()} dominate the error: uniform K4V8 has held-out KL {k4v8['kl']:.4f}, K8V4 "
        f"{k8v4['kl']:.4f} (both 6 bits); 4-bit {side} cost far more than 4-bit {other}."
    )
    rich = min((p for p in CANDIDATE_PAIRS if (p.key_bits if keys_dominate else p.value_bits) == 8), key=pair_bits)
    lines.append(
        f"- The cheapest pair with 8-bit {side} is {rich.label} ({pair_bits(rich):g} bits): under a "
        f"{result.opts['budget']:g}-bit budget most layers must take 4-bit or 2-bit {side}."
    )
    column = result.kl[:, list(result.pairs).index(pair(4, 4))]
    if not column.isnan().any() and float(column.min()) > 0:
        lines.append(
            f"- Single-layer KL of KV4 ranges {float(column.min()):.4f}-{float(column.max()):.4f} across layers "
            f"(max/min {float(column.max() / column.min()):.1f}x): the flatter this profile, the less a layer-wise "
            "map gains over a uniform one of the same size."
        )
    return lines


def markdown(result: Result) -> str:
    info, opts = result.info, result.opts
    chosen_map = precision_map(result)
    base = result.heldout["unquantized"]
    chosen = result.heldout[result.chosen_name]
    rows = [_row("unquantized (bf16)" if info.dtype == torch.bfloat16 else "unquantized", base, base),
            _row(f"**chosen map** ({chosen['avg_bits']:.2f} bits)", chosen, base)]
    uniform = sorted(CANDIDATE_PAIRS, key=lambda p: -(p.key_bits + p.value_bits))
    rows += [_row(f"uniform {p.label}", result.heldout[p.label], base) for p in uniform]
    layout = "\n".join(f"| {p.label} | {len(ls)} | {compact_ranges(ls)} |" for p, ls in chosen_map.pairs().items())
    front = "\n".join(
        f"| {r['avg_bits']:.3f} | {r['surrogate_kl']:.5f} | {r['calibration_kl']:.5f} | {r['heldout_kl']:.5f} | "
        f"{r['heldout_ppl']:.3f} | {'yes' if r['chosen'] else ''} |"
        for r in _front_rows(result) if "heldout_kl" in r
    )
    summary = chosen_map.summary(info.head_dim, info.num_kv_heads, info.dtype)
    checks = target_check(result)
    why = ""
    if any("NOT" in line for line in checks):
        why = "\nWhat bounds the result on this model (measured in this run):\n" + "\n".join(diagnosis(result)) + "\n"
    return f"""# KV precision calibration: {info.name}

Budget {opts['budget']:g} average bits, group size {opts['group_size']}, seed {opts['seed']}, {opts['device']}
{str(info.dtype).removeprefix('torch.')}; text: {', '.join(opts['text']) or 'pydoc_data.topics (offline default)'};
{result.tokens['calibration']} calibration tokens ({result.tokens['sensitivity']} for the per-layer KL pass),
{result.tokens['heldout']} held-out tokens the search never saw. Wall time {result.wall_s:.0f} s.

## Held-out results

Mean next-token KL against the unquantized model and perplexity, on held-out text, with every
layer's K/V fake-quantized by `kvtuner_vllm.format.fake_quantize` (what the server stores).

| config | avg bits | KL (nats) | PPL | PPL vs unquantized |
|---|---|---|---|---|
{chr(10).join(rows)}

Targets:
{chr(10).join(checks)}
{why}
## Chosen map

```
{summary}
```

| pair | layers | which |
|---|---|---|
{layout}

## Pareto front (verified points)

NSGA-II front on the surrogate (sum of single-layer KL), the points nearest the budget and a spread
below it re-scored with real forward passes; the map with the lowest real calibration KL is chosen.
All {len(result.front)} front points are in pareto.json / pareto.csv; plot: pareto.png; per-layer
sensitivity: sensitivity.png.

| avg bits | surrogate KL | calibration KL | held-out KL | held-out PPL | chosen |
|---|---|---|---|---|---|
{front}
"""
