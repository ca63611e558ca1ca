"""Decode attention over the packed cache vs vLLM's own CPU bf16 attention, same run.

    python -m benchmarks.kernels.decode_attention [--quick] [--vllm-isa vec]

One decode step (one query token per sequence) of a Llama-3-8B-shaped layer (32 query
heads, 8 KV heads, head size 128, block size 128 as vLLM's CPU backend uses) for batch
sizes 1..64 and contexts 512..32k. Each configuration times vLLM's
`cpu_attention_with_kv_cache` on a bf16 page and `kvtuner.paged_attention` for each bit
pair, alternating them so that load from other processes hits both alike, and keeps the
fastest of the repetitions. Achieved bandwidth = bytes of the pages read (codes, scales
and zeros) / time. Writes benchmarks/results/decode_attention[_quick].json and a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_info
from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, GROUP_SIZE = 32, 8, 128, 128, 64
DTYPE = torch.bfloat16
BIT_PAIRS = {"KV8": (8, 8), "K8V4": (8, 4), "KV4": (4, 4), "K4V2": (4, 2), "KV2": (2, 2), "KV16": (16, 16)}
FULL_GRID = {"batches": [1, 4, 16, 64], "contexts": [512, 2048, 4096, 8192, 32768]}
QUICK_GRID = {"batches": [1, 16], "contexts": [512, 4096, 32768]}
MAX_CACHED_TOKENS = 512 * 1024  # batch x context cap: the bf16 pages of one layer stay <= 0.5 GiB


def fill_pages(fmt: kvformat.LayerFormat, num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Pages with real quantized content: 32 blocks written by the op, tiled over the rest."""
    source_blocks = min(num_blocks, 32)
    tokens = source_blocks * BLOCK_SIZE
    pages = torch.zeros(fmt.cache_shape(source_blocks, NUM_KV_HEADS, BLOCK_SIZE), dtype=torch.uint8)
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_SIZE, generator=generator).to(DTYPE)
    value = torch.randn(tokens, NUM_KV_HEADS, HEAD_SIZE, generator=generator).to(DTYPE)
    ops.quantize_and_cache(key, value, pages, torch.arange(tokens), fmt)
    repeats = -(-num_blocks // source_blocks)
    return pages.repeat(repeats, 1, 1, 1)[:num_blocks].contiguous()


class VllmAttention:
    """vLLM's CPU attention on a bf16 page [B, H, N, 2D] (K plane then V plane), as cpu_attn.py calls it."""

    def __init__(self, pages, block_table, seq_lens, query_start_loc, isa: str):
        from vllm import _custom_ops as vllm_ops

        self.vllm_ops = vllm_ops
        num_blocks = pages.shape[0]
        planes = pages.view(DTYPE).view(num_blocks, NUM_KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE)
        self.key_cache, self.value_cache = planes.chunk(2, dim=2)
        self.block_table, self.seq_lens, self.query_start_loc = block_table, seq_lens, query_start_loc
        self.metadata = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_SIZE,
            seq_lens=seq_lens, dtype=DTYPE, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=True,
        )

    def __call__(self, query, out):
        self.vllm_ops.cpu_attention_with_kv_cache(
            query=query, key_cache=self.key_cache, value_cache=self.value_cache, output=out,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, scale=HEAD_SIZE**-0.5, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0.0,
            scheduler_metadata=self.metadata, s_aux=None,
        )


def fastest(functions: dict, repeats: int, budget_s: float) -> dict[str, float]:
    """Fastest wall time of each function, calling them in turns until `repeats` or the budget."""
    best = {name: float("inf") for name in functions}
    for fn in functions.values():
        fn()  # warm up: page faults, thread pool, dispatch caches
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in functions.items():
            begin = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return best


def run_config(batch: int, context: int, isa: str, repeats: int, budget_s: float) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    block_table = torch.randperm(num_blocks, generator=generator).to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    query = torch.randn(batch, NUM_Q_HEADS, HEAD_SIZE, generator=generator).to(DTYPE)
    out = torch.empty_like(query)

    formats = {name: kvformat.LayerFormat(k, v, HEAD_SIZE, GROUP_SIZE, DTYPE) for name, (k, v) in BIT_PAIRS.items()}
    stock = formats["KV16"]  # byte-identical to a vLLM bf16 page
    functions, page_bytes = {}, {}
    vllm_pages = fill_pages(stock, num_blocks, generator)
    vllm_attention = VllmAttention(vllm_pages, block_table, seq_lens, query_start_loc, isa)
    functions["vLLM bf16"] = lambda: vllm_attention(query, out)
    page_bytes["vLLM bf16"] = batch * context * NUM_KV_HEADS * stock.bytes_per_token
    for name, fmt in formats.items():
        pages = fill_pages(fmt, num_blocks, generator)
        functions[name] = (lambda pages=pages, fmt=fmt: ops.paged_attention(
            out, query, pages, block_table, seq_lens, query_start_loc, 1, context, HEAD_SIZE**-0.5, fmt))
        page_bytes[name] = batch * context * NUM_KV_HEADS * fmt.bytes_per_token
    times = fastest(functions, repeats, budget_s)
    baseline = times["vLLM bf16"]
    return [
        {"batch": batch, "context": context, "kernel": name, "time_ms": t * 1e3, "gb_per_s": page_bytes[name] / t / 1e9,
         "speedup_vs_vllm_bf16": baseline / t}
        for name, t in times.items()
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for kernel in BIT_PAIRS:
            points = sorted((r["context"], r["speedup_vs_vllm_bf16"]) for r in rows
                            if r["batch"] == batch and r["kernel"] == kernel)
            ax.plot(*zip(*points, strict=True), marker="o", label=kernel)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
    axes[0][0].set_ylabel("speedup vs vLLM CPU bf16 attention")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"decode attention, {NUM_Q_HEADS}q/{NUM_KV_HEADS}kv heads, D={HEAD_SIZE}, G={GROUP_SIZE}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--vllm-isa", default="vec",
                        help="ISA for vLLM's kernel: vec (AVX-512/AVX2) or amx (needs AMX tiles enabled)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    grid = QUICK_GRID if args.quick else FULL_GRID
    rows = []
    for batch in grid["batches"]:
        for context in grid["contexts"]:
            if batch * context > MAX_CACHED_TOKENS:
                continue
            config_rows = run_config(batch, context, args.vllm_isa, args.repeats, budget_s=3.0)
            rows += config_rows
            cells = "  ".join(
                f"{r['kernel']} {r['time_ms']:.2f}ms {r['gb_per_s']:.1f}GB/s x{r['speedup_vs_vllm_bf16']:.2f}"
                for r in config_rows
            )
            print(f"batch {batch:3d} context {context:6d}  {cells}", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = "decode_attention_quick" if args.quick else "decode_attention"
    meta = {"cpu": machine_info()["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "vllm_isa": args.vllm_isa, "shape": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS,
                                                 "head_size": HEAD_SIZE, "block_size": BLOCK_SIZE,
                                                 "group_size": GROUP_SIZE, "dtype": str(DTYPE)}}
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {RESULTS_DIR / stem}.json and .png ({meta['cpu']}, {meta['threads']} threads)")


if __name__ == "__main__":
    main()
