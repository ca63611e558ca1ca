"""One layer's attention step over the packed cache vs vLLM's own CPU attention, same run.

    python -m benchmarks.kernels.attention_steps [--quick] [--shape smollm2|llama3-8b]

A step is what a backend runs per layer: the cache write (vLLM's `cpu_attn_reshape_and_cache`;
our `quantize_and_cache`, and `write_window` for a map with a window) and the attention over
the paged cache. Three steps of a served batch: decode (32 sequences of 1100 tokens, one query
token each), prefill (one fresh 1024-token prompt) and mixed (31 such decodes beside a
1024-token prefill chunk). Decode runs twice: with the pages left in the caches by the turn
before (a layer's pages fit the last-level cache when it is not shared), and with cold caches
(a buffer 1.5x the last-level cache read before each call), which is what a served layer finds:
between two steps of one layer, the other layers' pages and weights went through the caches.

vLLM runs at the ISA it picks on this machine (`amx` where the CPU has AMX tiles, after
requesting their permission as vLLM's worker does) in bf16 and in its fp8 cache; ours for the
bit pairs of the bundled maps, and KV16 (our own 16-bit kernel) as the control row that
separates the kernel from the bytes; KV4 also with the AMX decode kernel off (the vector kernel
on the same pages). Every kernel is called once per turn, back to back, so that other load hits
all alike; a speedup is the median of the per-turn ratios to vLLM bf16, with their interquartile
range, and a time the median over the turns (every turn's time is kept). Decode rows also give the
bytes of the pages read per second.
Writes benchmarks/results/attention_steps[_quick].json and a PNG.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_json
from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops

SHAPES = {  # (query heads, KV heads, head size)
    "smollm2": (9, 3, 64),
    "llama3-8b": (32, 8, 128),
}
BLOCK_SIZE = 128  # vLLM's CPU default and ours
DTYPE = torch.bfloat16
DECODE = (32, 1100)  # sequences, context
PROMPT = 1024
# Our formats: the unquantized control, uniform maps of the default (per-token G64, R32), format v1
# (no window: what the window costs) and the bundled calibrated preset's scheme (kivi G_t32, G32, R64).
OURS = {
    "ours KV16": dict(key_bits=16, value_bits=16, group_size=64),
    "ours KV8 R32": dict(key_bits=8, value_bits=8, group_size=64, residual_length=32),
    "ours K8V4 R32": dict(key_bits=8, value_bits=4, group_size=64, residual_length=32),
    "ours KV4 R32": dict(key_bits=4, value_bits=4, group_size=64, residual_length=32),
    "ours KV4 R32, vector decode": dict(key_bits=4, value_bits=4, group_size=64, residual_length=32),
    "ours KV4 v1 (no window)": dict(key_bits=4, value_bits=4, group_size=64),
    "ours KV4 kivi R64": dict(key_bits=4, value_bits=4, group_size=32, scheme=kvformat.KIVI, key_group_size=32,
                              residual_length=64),
    "ours K4V2 kivi R64": dict(key_bits=4, value_bits=2, group_size=32, scheme=kvformat.KIVI, key_group_size=32,
                               residual_length=64),
}
# Control rows run with the AMX decode kernel off (KVTUNER_DECODE_ISA=off, read at every call):
# the same pages through the vector kernel, which shows what the matrix units bring to decode.
VECTOR_DECODE = {"ours KV4 R32, vector decode"}
VLLM = {"vLLM bf16": "auto", "vLLM fp8": "fp8"}


@dataclass
class Step:
    """A batch: per sequence its history length and this step's query rows."""

    name: str
    history: list[int]
    rows: list[int]
    cold: bool = False  # evict the caches before each call

    @property
    def seq_lens(self) -> list[int]:
        return [h + r for h, r in zip(self.history, self.rows, strict=True)]


def steps() -> list[Step]:
    seqs, context = DECODE
    return [
        Step("decode", [context - 1] * seqs, [1] * seqs),
        Step("decode, cold caches", [context - 1] * seqs, [1] * seqs, cold=True),
        Step("prefill", [0], [PROMPT]),
        Step("mixed", [context - 1] * (seqs - 1) + [0], [1] * (seqs - 1) + [PROMPT]),
    ]


class Batch:
    """Block table, lengths and the step's rows; history K/V to write into each cache once."""

    def __init__(self, step: Step, num_q_heads: int, num_kv_heads: int, head_size: int, generator: torch.Generator):
        seq_lens = step.seq_lens
        self.blocks_per_seq = -(-max(seq_lens) // BLOCK_SIZE)
        self.num_blocks = len(seq_lens) * self.blocks_per_seq
        order = torch.randperm(self.num_blocks, generator=generator).to(torch.int32)
        self.block_table = order.view(len(seq_lens), self.blocks_per_seq)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        self.query_start_loc[1:] = torch.tensor(step.rows).cumsum(0)
        self.history_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        self.history_start_loc[1:] = torch.tensor(step.history).cumsum(0)
        self.history_lens = torch.tensor(step.history, dtype=torch.int32)
        self.max_query_len, self.max_seq_len = max(step.rows), max(seq_lens)
        self.history_slots = self._slots([(0, h) for h in step.history])
        self.slots = self._slots([(h, h + r) for h, r in zip(step.history, step.rows, strict=True)])
        channel_offset = torch.randn(num_kv_heads, head_size, generator=generator) * 2  # outlier key channels
        def rows(n: int, offset=0.0) -> torch.Tensor:
            return (torch.randn(n, num_kv_heads, head_size, generator=generator) + offset).to(DTYPE)
        self.history_key, self.history_value = rows(sum(step.history), channel_offset), rows(sum(step.history))
        self.key, self.value = rows(sum(step.rows), channel_offset), rows(sum(step.rows))
        self.query = torch.randn(sum(step.rows), num_q_heads, head_size, generator=generator).to(DTYPE)
        self.out = torch.empty_like(self.query)
        self.scale = head_size**-0.5

    def _slots(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        slots = [self.block_table[s, torch.arange(a, b) // BLOCK_SIZE].long() * BLOCK_SIZE + torch.arange(a, b)
                 % BLOCK_SIZE for s, (a, b) in enumerate(ranges)]
        return torch.cat(slots)


def served_vllm_isa(head_size: int, kv_cache_dtype: str) -> str:
    """The ISA vLLM's CPU backend picks here, with AMX permission requested as its worker does."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()
    return _get_attn_isa(DTYPE, BLOCK_SIZE, head_size, kv_cache_dtype)


class VllmStep:
    """vLLM's CPU backend step: reshape_and_cache then attention over [B, H, 2N, D] (K plane, V plane)."""

    def __init__(self, batch: Batch, num_q_heads: int, num_kv_heads: int, head_size: int, kv_cache_dtype: str):
        from vllm import _custom_ops as vllm_ops

        self.ops, self.batch, self.kv_cache_dtype = vllm_ops, batch, kv_cache_dtype
        self.isa = served_vllm_isa(head_size, kv_cache_dtype)
        cache_dtype = torch.uint8 if kv_cache_dtype == "fp8" else DTYPE  # vLLM stores fp8 as bytes
        cache = torch.zeros(batch.num_blocks, num_kv_heads, 2 * BLOCK_SIZE, head_size, dtype=cache_dtype)
        self.key_cache, self.value_cache = cache.chunk(2, dim=2)
        self.bytes_per_token = 2 * head_size * cache.element_size() * num_kv_heads
        if batch.history_slots.numel():
            self._write(batch.history_key, batch.history_value, batch.history_slots)
        self.metadata = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch.seq_lens.numel(), num_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
            seq_lens=batch.seq_lens, dtype=DTYPE, query_start_loc=batch.query_start_loc, causal=True,
            sliding_window_size=-1, isa=self.isa, enable_kv_split=True, kv_cache_dtype=kv_cache_dtype)

    def _write(self, key, value, slots) -> None:
        self.ops.cpu_attn_reshape_and_cache(key, value, self.key_cache, self.value_cache, slots, self.isa,
                                            kv_cache_dtype=self.kv_cache_dtype)

    def __call__(self) -> None:
        b = self.batch
        self._write(b.key, b.value, b.slots)
        self.ops.cpu_attention_with_kv_cache(
            query=b.query, key_cache=self.key_cache, value_cache=self.value_cache, output=b.out,
            query_start_loc=b.query_start_loc, seq_lens=b.seq_lens, scale=b.scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=b.block_table, softcap=0.0, scheduler_metadata=self.metadata, s_aux=None,
            kv_cache_dtype=self.kv_cache_dtype)


class KVTunerStep:
    """Our backend's step: quantize_and_cache, paged_attention (packed pages + ring + the step's rows),
    write_window."""

    def __init__(self, batch: Batch, num_kv_heads: int, fmt: kvformat.LayerFormat, generator: torch.Generator,
                 decode_isa: str = "amx"):
        self.batch, self.fmt, self.decode_isa = batch, fmt, decode_isa
        self.kv_cache = torch.zeros(fmt.cache_shape(batch.num_blocks, num_kv_heads, BLOCK_SIZE), dtype=torch.uint8)
        self.bytes_per_token = fmt.bytes_per_token * num_kv_heads
        self.ring_cache = self.ring_block_ids = None
        if fmt.has_window:
            num_seqs = batch.seq_lens.numel()
            self.ring_cache = torch.zeros(fmt.ring_shape(num_seqs, num_kv_heads), dtype=DTYPE)
            self.ring_block_ids = torch.randperm(num_seqs, generator=generator).to(torch.int32)
        if batch.history_slots.numel():
            history = (batch.history_start_loc, batch.history_lens)
            ops.quantize_and_cache(batch.history_key, batch.history_value, self.kv_cache, batch.history_slots, fmt,
                                   *history, self.ring_cache, self.ring_block_ids)
            self._write_window(batch.history_key, batch.history_value, *history)

    def _write_window(self, key, value, query_start_loc, seq_lens) -> None:
        if self.ring_cache is not None:
            ops.write_window(key, value, self.ring_cache, self.ring_block_ids, query_start_loc, seq_lens, self.fmt)

    @functools.cached_property
    def isa(self) -> str:
        """The routes one call of this step takes (the kernels' own count), e.g. `vector_avx512`."""
        ops.reset_cpu_routes()
        self()
        routes = ops.cpu_routes()
        return " + ".join(sorted(f"vector_{routes.vector_isa}" if route == "vector" else route
                                 for route in routes.taken()))

    def __call__(self) -> None:
        b = self.batch
        os.environ["KVTUNER_DECODE_ISA"] = self.decode_isa
        ops.quantize_and_cache(b.key, b.value, self.kv_cache, b.slots, self.fmt, b.query_start_loc, b.seq_lens,
                               self.ring_cache, self.ring_block_ids)
        ops.paged_attention(b.out, b.query, b.key, b.value, self.kv_cache, b.block_table, b.seq_lens,
                            b.query_start_loc, b.max_query_len, b.max_seq_len, b.scale, self.fmt, self.ring_cache,
                            self.ring_block_ids)
        self._write_window(b.key, b.value, b.query_start_loc, b.seq_lens)


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache (sysfs), 256 MiB where the system does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return 256 * 2**20


class CacheEvictor:
    """Reads a buffer 1.5x the last-level cache, so that the next call finds its pages in DRAM."""

    def __init__(self) -> None:
        self.buffer = torch.ones(last_level_cache_bytes() * 3 // 2, dtype=torch.uint8)

    def __call__(self) -> None:
        self.buffer.amax()


def turn_times(functions: dict, repeats: int, budget_s: float, before=None) -> dict[str, list[float]]:
    """Each function's wall time in every turn of `repeats` (fewer if the budget runs out), the functions
    called back to back within a turn so that a turn's ratios compare them under the same load; `before`,
    if given, runs untimed before each call."""
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()  # warm up: page faults, thread pool, dispatch caches
    start = time.perf_counter()
    for turn in range(repeats):
        for name, fn in functions.items():
            if before is not None:
                before()
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
        if turn >= 4 and time.perf_counter() - start > budget_s:
            break
    return times


def paired_speedup(baseline: list[float], times: list[float]) -> tuple[float, list[float]]:
    """Median and [25th, 75th percentile] of the per-turn speedups baseline / time (the same turn's two
    calls): the middle half says what a turn gives, where the extremes are single turns that another
    process interrupted."""
    low, median, high = statistics.quantiles([b / t for b, t in zip(baseline, times, strict=True)], n=4)
    return median, [low, high]


def run_step(step: Step, shape: str, repeats: int, budget_s: float) -> list[dict]:
    num_q_heads, num_kv_heads, head_size = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    batch = Batch(step, num_q_heads, num_kv_heads, head_size, generator)
    kernels = {name: VllmStep(batch, num_q_heads, num_kv_heads, head_size, dtype) for name, dtype in VLLM.items()}
    for name, options in OURS.items():
        fmt = kvformat.LayerFormat(head_size=head_size, dtype=DTYPE, **options)
        kernels[name] = KVTunerStep(batch, num_kv_heads, fmt, generator, "off" if name in VECTOR_DECODE else "amx")
    times = turn_times(kernels, repeats, budget_s, CacheEvictor() if step.cold else None)
    tokens_read = int(batch.seq_lens.sum())
    rows = []
    for name, turns in times.items():
        median_s = statistics.median(turns)
        speedup, speedup_iqr = paired_speedup(times["vLLM bf16"], turns)
        rows.append({"step": step.name, "shape": shape, "kernel": name, "isa": kernels[name].isa,
                     "time_ms": median_s * 1e3, "times_ms": [t * 1e3 for t in turns],
                     "speedup_vs_vllm_bf16": speedup, "speedup_iqr": speedup_iqr,
                     "kv_bytes_per_token": kernels[name].bytes_per_token,
                     "gb_per_s": tokens_read * kernels[name].bytes_per_token / median_s / 1e9})
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    step_names = list(dict.fromkeys(r["step"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.8), squeeze=False)
    width = 0.8 / len(names)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, name in enumerate(names):
            values = [next(r["speedup_vs_vllm_bf16"] for r in rows if (r["shape"], r["step"], r["kernel"])
                           == (shape, s, name)) for s in step_names]
            ax.bar([j + i * width for j in range(len(step_names))], values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(step_names))], step_names)
        ax.set_ylabel("speedup vs vLLM bf16 (same run)")
        ax.set_title(f"{shape}, per layer step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2's shape only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    shapes = ["smollm2"] if args.quick else list(SHAPES)
    repeats = 10 if args.quick else args.repeats
    rows = []
    for shape in shapes:
        for step in steps():
            step_rows = run_step(step, shape, repeats, budget_s=30.0 if step.cold else 20.0)
            rows += step_rows
            print(f"{shape} {step.name}: " + "  ".join(
                f"{r['kernel']} {r['time_ms']:.2f}ms x{r['speedup_vs_vllm_bf16']:.2f}" for r in step_rows), flush=True)
    settings = {"block_size": BLOCK_SIZE, "dtype": str(DTYPE), "decode": DECODE, "prompt": PROMPT,
                "threads": torch.get_num_threads(), "repeats": repeats}
    stem = "attention_steps_quick" if args.quick else "attention_steps"
    command = "python -m benchmarks.kernels.attention_steps" + (" --quick" if args.quick else "")
    path = write_json(stem, {"command": command, "machine": machine_info(), "settings": settings, "rows": rows})
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
