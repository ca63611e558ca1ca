"""Small CUDA cases for scripts/gpu_check.sh: scenarios of tests/kernels/cuda_emulator/scenarios.py
on the real kernels, each output checked against the format.py references, so a clean run is
also a correct one. Exits non-zero on the first difference.

* The sanitizer cases (gpu_check.sh runs them under compute-sanitizer memcheck, racecheck and
  synccheck): the ops called eagerly.
* --graphs: quantize_and_cache, paged_attention and write_window each captured in a CUDA graph
  once per batch shape and replayed for every step of that shape, with the step's data copied
  into the captured tensors first, as vLLM replays a captured batch (fixed num_tokens, num_seqs,
  max_query_len; padded entries and rows). No host reads: max_seq_len is a bound from the
  shapes and the workspace is allocated from the shapes. A failed capture is a failure.

    python scripts/gpu_sanitize.py [--scenarios a,b,...]
    python scripts/gpu_sanitize.py --graphs [--scenarios ...]
    python scripts/gpu_sanitize.py --emulator [--graphs]  # dry run on the CPU: the host emulator instead
                                                          # of a GPU (graphs: a capture that re-runs the calls)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "kernels")]

import torch  # noqa: E402
from cuda_emulator import binding  # noqa: E402
from cuda_emulator.scenarios import KIVI, SCENARIOS, Scenario, TorchOps, layer, run_scenario  # noqa: E402

from kvtuner_vllm import ops as kernel_ops  # noqa: E402

# Every kernel and path at small sizes: decode split, window with mixed decode + prefill, kivi
# keys, an odd head size, speculative decode with GQA 5.
DEFAULT_SCENARIOS = ["window-mixed", "kivi", "head80-fp16", "spec-decode-gqa5", "decode-split-v1"]

# Batches of one shape step after step, as a captured graph sees them (vLLM's UNIFORM_BATCH).
GRAPH_SCENARIOS = {
    # Uniform decode: long contexts split across partitions (the workspace), a padded entry
    # (no rows, seq_len 0), padding rows past the last sequence; six replays of each graph.
    "graph-decode": Scenario(layer((4, 2), 128, 64, window=8), 4, 2, 16, [1500, 17, 0, 64],
                             [[1] * 6, [1] * 6, [], [1] * 6], padding_rows=2),
    # Speculative decode (4 query tokens per sequence) on kivi keys, a window of 32.
    "graph-spec-kivi": Scenario(layer((4, 4), 64, 64, scheme=KIVI, key_group=16, window=32), 8, 2, 32, [100, 47],
                                [[4] * 4, [4] * 4], padding_rows=1),
    # max_query_len a fixed bound above the true query lengths (scenarios.py).
    "graph-bounds": SCENARIOS["graph-bounds"],
}


class GraphSafeTorchOps(TorchOps):
    """TorchOps without host reads: max_seq_len is the block table's capacity (a bound; the CUDA
    plan does not use it), so paged_attention can be captured."""

    def paged_attention(self, out, query, key, value, cache, block_table, seq_lens, query_start_loc, max_query_len,
                        scale, ring, ring_ids, softcap) -> None:
        size = kernel_ops.attention_workspace_size(seq_lens.numel(), max_query_len, query.shape[1], cache.shape[1],
                                                   self.fmt.head_size)
        workspace = torch.empty(size, dtype=torch.uint8, device=self.device)
        max_seq_len = block_table.shape[1] * cache.shape[2]
        kernel_ops.paged_attention(out, query, key, value, cache, block_table, seq_lens, query_start_loc,
                                   max_query_len, max_seq_len, scale, self.fmt, ring, ring_ids, softcap, workspace)


class CudaGraphs:
    """Captures a function in a CUDA graph after one warm-up call on a side stream (torch's recipe)."""

    def capture(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph


class RecordedCalls:
    """The dry run's stand-in for a CUDA graph: replay() runs the captured function again."""

    def capture(self, fn):
        return SimpleNamespace(replay=fn)


class GraphOps:
    """The ops of `inner` captured once per (op, argument shapes, scalars) and replayed after
    copying each call's tensors into the captured ones (and back: the cache, the ring and the
    output are written in place)."""

    def __init__(self, inner, graphs):
        self.inner, self.graphs = inner, graphs
        self.device, self.fmt = inner.device, inner.fmt
        self.captured: dict = {}
        self.replays = 0

    def _call(self, name: str, args: tuple) -> None:
        key = (name, *((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
        if key not in self.captured:
            static = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            op = getattr(self.inner, name)
            try:
                graph = self.graphs.capture(lambda: op(*static))
            except Exception as error:
                raise RuntimeError(f"capturing {name} failed: {error}") from error
            self.captured[key] = (static, graph)
        static, graph = self.captured[key]
        tensors = [(s, a) for s, a in zip(static, args) if isinstance(a, torch.Tensor)]
        for s, a in tensors:
            s.copy_(a)
        graph.replay()
        self.replays += 1
        for s, a in tensors:
            a.copy_(s)

    def quantize_and_cache(self, *args) -> None:
        self._call("quantize_and_cache", args)

    def paged_attention(self, *args) -> None:
        self._call("paged_attention", args)

    def write_window(self, *args) -> None:
        self._call("write_window", args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", help=f"default: {DEFAULT_SCENARIOS}, with --graphs {list(GRAPH_SCENARIOS)}")
    parser.add_argument("--graphs", action="store_true", help="capture the ops in CUDA graphs and replay them")
    parser.add_argument("--emulator", action="store_true", help="run on the host emulator (no GPU needed)")
    args = parser.parse_args()
    known = {**SCENARIOS, **GRAPH_SCENARIOS}
    names = args.scenarios.split(",") if args.scenarios else list(GRAPH_SCENARIOS if args.graphs else DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(known)}")

    if args.emulator:
        library = binding.build(Path(tempfile.mkdtemp(prefix="kvtuner-emulator-")))

        def make_ops(fmt):
            return binding.EmulatorOps(library, fmt)

        graphs = RecordedCalls()
    else:
        if not torch.cuda.is_available():
            print("gpu_sanitize: no CUDA device", file=sys.stderr)
            return 2
        kernel_ops.load_kernels()

        def make_ops(fmt):
            return GraphSafeTorchOps("cuda", fmt) if args.graphs else TorchOps("cuda", fmt)

        graphs = CudaGraphs()

    for name in names:
        start = time.perf_counter()
        scenario = known[name]
        ops = make_ops(scenario.fmt)
        detail = ""
        if args.graphs:
            ops = GraphOps(ops, graphs)
        run_scenario(ops, scenario)
        if args.graphs:
            if ops.replays <= len(ops.captured):
                print(f"gpu_sanitize: {name}: no graph was replayed twice ({len(ops.captured)} graphs, "
                      f"{ops.replays} replays): the scenario's steps change shape", file=sys.stderr)
                return 1
            detail = f", {len(ops.captured)} graphs captured, {ops.replays} replays"
        print(f"gpu_sanitize: ok {name} ({time.perf_counter() - start:.1f} s{detail})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
