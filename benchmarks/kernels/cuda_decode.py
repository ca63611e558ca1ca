"""CUDA decode attention over the packed cache vs our own KV16 and torch SDPA, in one run.

    python -m benchmarks.kernels.cuda_decode [--out DIR] [--quick] [--budget-s S] [--require-graphs]
    python -m benchmarks.kernels.cuda_decode --dry-run   # the same logic on the CPU, tiny sizes

One decode step (one query token per sequence) of a Llama-3-8B-shaped layer (32 query heads,
8 KV heads, head size 128, bf16, block size 16 as vLLM's CUDA backends use) for batches 1-64
and contexts 1k-32k:
* `kvtuner.paged_attention` for each bit pair (per-token groups of 64, no window) and one kivi
  layer (key groups of 32 positions, window 32, block size 32);
* the same op on a 16/16 layer (KV16: our kernel on bf16 pages);
* torch SDPA over the same context stored contiguously in bf16 ([B, H_kv, L, D]; the GQA
  group is SDPA's query length, so each KV head is read once).
Each configuration is timed as a CUDA graph of 20 back-to-back calls (launch overhead out),
the median of 5 replays; if a capture fails the rest is timed eagerly (the rows say so), or,
with --require-graphs (scripts/gpu_check.sh), the run stops with an error. Successive calls
read different pages (a pool of at least 256 MiB) so that small configurations are not served
from L2. Achieved bandwidth = bytes of K/V read (codes, scales, zeros; window rows from the
ring) / time, next to the device-to-device copy bandwidth measured in the same run (bytes read
+ written / time). Page contents are random bytes: timing does not depend on them (the kernel
tests check the numbers).
Writes DIR/cuda_decode.json (default: benchmarks/results) and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, machine_info
from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, GROUP_SIZE = 32, 8, 128, 64
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Variant:
    name: str
    fmt: kvformat.LayerFormat
    block_size: int


def variants() -> list[Variant]:
    pairs = {"KV8": (8, 8), "K8V4": (8, 4), "KV4": (4, 4), "K4V2": (4, 2), "KV2": (2, 2), "KV16": (16, 16)}
    found = [Variant(name, kvformat.LayerFormat(*bits, HEAD_SIZE, GROUP_SIZE, DTYPE), 16)
             for name, bits in pairs.items()]
    kivi = kvformat.LayerFormat(4, 2, HEAD_SIZE, GROUP_SIZE, DTYPE, kvformat.KIVI, 32, 32)
    return found + [Variant("K4V2-kivi-R32", kivi, 32)]


FULL_GRID = {"batches": [1, 4, 16, 64], "contexts": [1024, 4096, 16384, 32768]}
QUICK_GRID = {"batches": [1, 16, 64], "contexts": [1024, 32768]}
DRY_GRID = {"batches": [1, 2], "contexts": [64, 96]}
POOL_BYTES = 256 << 20  # pages touched by one timed graph at least: well above any L2
CALLS_PER_GRAPH, REPLAYS = 20, 5


class GraphCaptureError(RuntimeError):
    """A capture failed under --require-graphs."""


class Timer:
    """Seconds per call of fn: a CUDA graph of CALLS_PER_GRAPH calls, median of REPLAYS replays
    (eagerly with events if capture fails, unless require_graphs; wall clock on the CPU)."""

    def __init__(self, device: str, require_graphs: bool = False):
        self.device = device
        self.graphs = True
        self.require_graphs = require_graphs

    def __call__(self, calls: list) -> float:
        if self.device == "cpu":
            return self._wall(calls)
        for fn in calls[:2]:
            fn()  # warm-up: lazy init, autotuning
        torch.cuda.synchronize()
        if self.graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for fn in calls:
                        fn()
                return self._events(graph.replay, len(calls))
            except RuntimeError as error:  # keep the numbers, say how they were taken
                if self.require_graphs:
                    raise GraphCaptureError(f"CUDA graph capture failed: {error}") from error
                print(f"cuda_decode: graph capture failed ({error}); timing eagerly", flush=True)
                self.graphs = False

        def eager():
            for fn in calls:
                fn()

        return self._events(eager, len(calls))

    @staticmethod
    def _events(run, calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(REPLAYS):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(times)

    @staticmethod
    def _wall(calls: list) -> float:
        """The CPU dry run: the fastest of two calls (the numbers only show that the logic runs)."""
        times = []
        for fn in calls[:2]:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        return min(times)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, GB/s counting bytes read and written."""
    size = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = Timer(device)([lambda: dst.copy_(src)] * 5)
    return 2 * size / seconds / 1e9


class PackedDecode:
    """Calls of kvtuner.paged_attention, each over its own block table into a shared page pool."""

    def __init__(self, variant: Variant, batch: int, context: int, device: str, reference: bool):
        fmt, block_size = variant.fmt, variant.block_size
        self.fmt = fmt
        blocks_per_seq = -(-context // block_size)
        needed = batch * blocks_per_seq
        block_bytes = NUM_KV_HEADS * block_size * fmt.bytes_per_token
        pool = max(needed, min(needed * CALLS_PER_GRAPH, -(-POOL_BYTES // block_bytes)))
        self.cache = torch.randint(0, 256, fmt.cache_shape(pool, NUM_KV_HEADS, block_size), dtype=torch.uint8,
                                   device=device)
        if fmt.kivi_keys or fmt.value_bits != 16:
            self._finite_params(block_size)
        self.tables = [torch.randperm(pool, device=device)[:needed].view(batch, -1).to(torch.int32)
                       for _ in range(CALLS_PER_GRAPH)]
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.query = torch.randn(batch, NUM_Q_HEADS, HEAD_SIZE, device=device, dtype=DTYPE)
        self.key = torch.randn(batch, NUM_KV_HEADS, HEAD_SIZE, device=device, dtype=DTYPE)
        self.value = torch.randn(batch, NUM_KV_HEADS, HEAD_SIZE, device=device, dtype=DTYPE)
        self.out = torch.empty_like(self.query)
        self.ring = self.ring_ids = None
        if fmt.has_window:
            self.ring = torch.randn(fmt.ring_shape(batch, NUM_KV_HEADS), device=device, dtype=DTYPE)
            self.ring_ids = torch.arange(batch, dtype=torch.int32, device=device)
        size = ops.max_attention_workspace_size(NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE)
        self.workspace = torch.empty(size, dtype=torch.uint8, device=device)
        self.context, self.batch, self.reference = context, batch, reference
        # The query at context - 1 reads positions below w0 packed, the rest (ring, own row) in bf16.
        packed = int(kvref.window_start(torch.tensor(context - 1), block_size, fmt.window))
        self.bytes = batch * NUM_KV_HEADS * (packed * fmt.bytes_per_token +
                                             (context - packed) * 2 * HEAD_SIZE * DTYPE.itemsize)

    def _finite_params(self, block_size: int) -> None:
        """Random scale/zero bytes hold infs and NaNs; rewrite them as small fp16 values."""
        planes = self.cache.flatten(2)
        offsets = self.fmt.plane_offsets(block_size)
        sizes = (block_size * self.fmt.key_param_bytes, block_size * self.fmt.value_param_bytes)
        for start, size in ((offsets[1], sizes[0]), (offsets[3], sizes[1])):
            if size:
                params = planes[:, :, start : start + size]
                params.copy_(torch.rand(params.shape[:2] + (size // 2,), device=params.device).to(torch.float16)
                             .view(torch.uint8))

    def calls(self) -> list:
        return [lambda table=table: self._call(table) for table in self.tables]

    def _call(self, table) -> None:
        if self.reference:  # dry run: the format.py reference stands in for the kernels
            self.out.copy_(kvref.paged_attention_ref(self.query, self.key, self.value, self.cache, table,
                                                        self.seq_lens, self.query_start_loc, HEAD_SIZE**-0.5,
                                                        self.fmt, self.ring, self.ring_ids))
            return
        ops.paged_attention(self.out, self.query, self.key, self.value, self.cache, table, self.seq_lens,
                            self.query_start_loc, 1, self.context, HEAD_SIZE**-0.5, self.fmt, self.ring, self.ring_ids,
                            workspace=self.workspace)


class SdpaDecode:
    """torch SDPA over contiguous bf16 K/V [B, H_kv, L, D]; the GQA group is the query length."""

    def __init__(self, batch: int, context: int, device: str):
        group = NUM_Q_HEADS // NUM_KV_HEADS
        shape = (batch, NUM_KV_HEADS, context, HEAD_SIZE)
        one = batch * NUM_KV_HEADS * context * HEAD_SIZE * DTYPE.itemsize * 2
        copies = max(1, min(CALLS_PER_GRAPH, -(-POOL_BYTES // one)))
        self.kv = [(torch.randn(shape, device=device, dtype=DTYPE), torch.randn(shape, device=device, dtype=DTYPE))
                   for _ in range(copies)]
        self.query = torch.randn(batch, NUM_KV_HEADS, group, HEAD_SIZE, device=device, dtype=DTYPE)
        self.bytes = one

    def calls(self) -> list:
        copies = len(self.kv)
        return [lambda kv=self.kv[i % copies]: F.scaled_dot_product_attention(self.query, *kv)
                for i in range(CALLS_PER_GRAPH)]


def run(grid: dict, device: str, reference: bool, budget_s: float,
        require_graphs: bool = False) -> tuple[list[dict], list[str]]:
    timer = Timer(device, require_graphs)
    rows, skipped = [], []
    start = time.perf_counter()
    # Longest contexts first: a time budget drops the configurations that say least about bandwidth.
    configs = [(b, c) for c in sorted(grid["contexts"], reverse=True) for b in sorted(grid["batches"], reverse=True)]
    for batch, context in configs:
        if time.perf_counter() - start > budget_s:
            skipped.append(f"batch {batch} context {context}")
            continue
        cases = [(v.name, v.fmt, lambda v=v, b=batch, c=context: PackedDecode(v, b, c, device, reference))
                 for v in variants()]
        cases.append(("SDPA-bf16", None, lambda b=batch, c=context: SdpaDecode(b, c, device)))
        for name, fmt, make in cases:
            case = make()
            try:
                seconds = timer(case.calls())
            except GraphCaptureError as error:
                raise SystemExit(f"cuda_decode: {name} batch {batch} context {context}: {error}") from error
            rows.append({"kernel": name, "batch": batch, "context": context,
                         "key_bits": fmt.key_bits if fmt else 16, "value_bits": fmt.value_bits if fmt else 16,
                         "time_us": seconds * 1e6, "bytes": case.bytes, "gbps": case.bytes / seconds / 1e9,
                         "graph": timer.graphs and device == "cuda"})
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"cuda_decode: batch {batch:3d} context {context:6d} done ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return rows, skipped


def summary(rows: list[dict], copy_gbps: float) -> str:
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = [f"device copy: {copy_gbps:.0f} GB/s (read + write)",
             "achieved GB/s (time us) per kernel; speedup = KV16 time / kernel time",
             f"{'batch':>5} {'context':>7} " + " ".join(f"{n:>20}" for n in names)]
    configs = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    for batch, context in configs:
        by_name = {r["kernel"]: r for r in rows if (r["batch"], r["context"]) == (batch, context)}
        base = by_name.get("KV16")
        cells = []
        for n in names:
            r = by_name[n]
            speedup = f" x{base['time_us'] / r['time_us']:.2f}" if base else ""
            cells.append(f"{r['gbps']:6.0f} ({r['time_us']:7.1f}){speedup}".rjust(20))
        lines.append(f"{batch:>5} {context:>7} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new configuration after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the reference instead of the op")
    parser.add_argument("--require-graphs", action="store_true",
                        help="a failed CUDA graph capture is an error (default: time that configuration eagerly)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_decode: no CUDA device (use --dry-run to check the script on the CPU)")
    if not args.dry_run:
        ops.load_kernels()
    grid = DRY_GRID if args.dry_run else QUICK_GRID if args.quick else FULL_GRID
    copy_gbps = copy_bandwidth(device)
    rows, skipped = run(grid, device, args.dry_run, args.budget_s, args.require_graphs)
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "dry_run": args.dry_run, "copy_gbps": copy_gbps, "layer": {
                  "num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_size": HEAD_SIZE,
                  "group_size": GROUP_SIZE, "dtype": str(DTYPE)},
              "calls_per_graph": CALLS_PER_GRAPH, "replays": REPLAYS, "rows": rows, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("cuda_decode_dry_run.json" if args.dry_run else "cuda_decode.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(rows, copy_gbps))
    if skipped:
        print(f"cuda_decode: {len(skipped)} configuration(s) skipped for the time budget: {skipped}")
    print(f"cuda_decode: wrote {path}")


if __name__ == "__main__":
    main()
