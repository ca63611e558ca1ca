"""The startup log block: which map a server runs, what it costs per token, and the capacity it buys
next to the model dtype's, once vLLM has sized the cache (EngineCore)."""

from __future__ import annotations

import logging

from kvtuner_vllm import map_estimate
from kvtuner_vllm.map_resolution import ModelInfo, ResolvedMap
from kvtuner_vllm.precision_map import compact_ranges
from kvtuner_vllm.vllm_config import model_info, resolved_map

logger = logging.getLogger("vllm.kvtuner")


def startup_block(vllm_config, memory_bytes: int, num_tokens: int, layers: list[int], ring_blocks: int = 0,
                  tokens_with_rings: int | None = None) -> str:
    """The one log block: map source and format, (K, V) pairs, bytes per token, capacity vs bf16 for
    the `layers` this process caches (all of them, or a pipeline stage's), and what the window rings
    cost (`ring_blocks` blocks per running request)."""
    resolved = resolved_map(vllm_config)
    info = model_info(vllm_config)
    block_size = vllm_config.cache_config.block_size
    dense_per_token = len(layers) * info.num_kv_heads * 2 * info.head_size * info.dtype.itemsize
    dense_tokens = memory_bytes // (dense_per_token * block_size) * block_size
    dtype_name = str(info.dtype).removeprefix("torch.")
    pc = vllm_config.parallel_config
    where = ""
    if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        where = (f" per rank (tensor parallel {pc.tensor_parallel_size}: {info.num_kv_heads} KV head(s) each; "
                 f"pipeline parallel {pc.pipeline_parallel_size}: this stage caches layers {compact_ranges(layers)})")
    lines = [
        "kvtuner KV cache",
        f"  precision map: {resolved.source}",
        *(f"  {line}" for line in quality_lines(resolved, info)),
        "  " + resolved.map.summary(info.head_size, info.num_kv_heads, info.dtype).replace("\n", "\n  "),
        f"  KV capacity{where}: {num_tokens:,} tokens in {memory_bytes / 2**30:.2f} GiB; {dtype_name} would hold "
        f"{dense_tokens:,} tokens ({num_tokens / max(dense_tokens, 1):.2f}x)",
    ]
    if ring_blocks:
        max_len = vllm_config.model_config.max_model_len
        lines.append(
            f"  allocated as {ring_blocks} ring block(s) ({ring_blocks * block_size} tokens' worth) per running "
            f"request; with them, {max_len}-token requests fill {tokens_with_rings:,} tokens "
            f"({tokens_with_rings / max(dense_tokens, 1):.2f}x {dtype_name})"
        )
    return "\n".join(lines)


def quality_lines(resolved: ResolvedMap, info: ModelInfo) -> list[str]:
    """What the map is known to cost on this model: its calibration's report, else a measurement `show-map` left
    (map_estimate), else how to get one."""
    if info.folder is None:
        return []
    record = resolved.map.calibration or {}
    if map_estimate.is_calibrated_for(resolved.map, info.folder.name) and "report" in record:
        report = record["report"]
        return [f"calibrated for this model: KL {report['kl']:.4f} nats/token, perplexity "
                f"{report['ppl_delta_pct']:+.2f}% on its report text"]
    found = map_estimate.load(info.folder, resolved.map)
    if found is not None:
        return map_estimate.describe(found)
    return ["not calibrated for this model nor measured on it: `kvtuner-vllm show-map MAP --model "
            f"{info.folder}` measures what it costs (seconds to a minute)"]


def log_startup_block(vllm_config, kv_cache_config) -> None:
    """In EngineCore, once vLLM has sized the cache: our block next to vLLM's own capacity line."""
    from vllm.model_executor.models.utils import extract_layer_index

    # Every KVCacheTensor describes a view into one shared backing allocation of `size` bytes.
    memory_bytes = vllm_config.cache_config.kv_cache_memory_bytes or max(
        tensor.size for tensor in kv_cache_config.kv_cache_tensors
    )
    num_tokens = kv_cache_config.num_blocks * vllm_config.cache_config.block_size
    groups = kv_cache_config.kv_cache_groups
    layers = sorted(extract_layer_index(name) for group in groups if group.kv_cache_spec.prefix_cacheable
                    for name in group.layer_names)
    # Each ring group (vLLM packs as many rings into a block as fit) holds one block per request;
    # vLLM's own count (max concurrency x max_model_len) already charges each request those blocks.
    ring_blocks = sum(not group.kv_cache_spec.prefix_cacheable for group in groups)
    block = startup_block(vllm_config, memory_bytes, num_tokens, layers, ring_blocks,
                          vllm_config.cache_config.kv_cache_size_tokens)
    logger.info("%s", block)
    for line in block.splitlines():
        if line.strip().startswith("WARNING"):  # a lossy map: also at warning level, where it is seen
            logger.warning("kvtuner: %s", line.strip().removeprefix("WARNING: "))
