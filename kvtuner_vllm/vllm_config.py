"""The bridge between vLLM's VllmConfig and the precision map: refusal of what we cannot serve,
map resolution in the API server, per-layer formats and rings in the workers.
Imported lazily by kvtuner_vllm.plugin, only when --kv-cache-dtype is kvtuner.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvtuner_vllm import DTYPE
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.errors import UnsupportedConfigError
from kvtuner_vllm.map_resolution import (
    CONFIG_KEY,
    RESOLVED_KEY,
    ModelInfo,
    ResolvedMap,
    check,
    check_block_size,
    resolve,
    user_options,
)
from kvtuner_vllm.precision_map import PrecisionMapError

logger = logging.getLogger("vllm.kvtuner")


def model_info(vllm_config) -> ModelInfo:
    mc = vllm_config.model_config
    served = mc.served_model_name
    served = [served] if isinstance(served, str) else list(served or [])
    names = (mc.model, *served, getattr(mc.hf_config, "_name_or_path", "") or "")
    return ModelInfo(
        names=tuple(n for n in names if n),
        folder=_model_folder(mc),
        num_layers=mc.get_total_num_hidden_layers(),
        head_size=mc.get_head_size(),
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        dtype=mc.dtype,
        block_size=vllm_config.cache_config.block_size,
    )


def _model_folder(mc) -> Path | None:
    if Path(mc.model).is_dir():
        return Path(mc.model)
    try:  # a hub repo id: its cached snapshot, without touching the network
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(mc.model, "config.json", revision=mc.revision)
    except Exception:  # noqa: BLE001 - not a repo id, no hub: no folder to look in
        return None
    return Path(config).parent if isinstance(config, str) else None


def _refusals(vllm_config) -> list[str]:
    """Every model shape and vLLM feature the packed pages do not handle, in words."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    text = mc.hf_text_config
    sliding = (mc.get_sliding_window() is not None and getattr(text, "use_sliding_window", True)) or any(
        "sliding" in str(t) for t in getattr(text, "layer_types", None) or ()
    )
    refused = [
        (mc.use_mla, "MLA attention (latent KV cache)"),
        (mc.is_encoder_decoder, "encoder-decoder models (cross-attention)"),
        (mc.is_hybrid or mc.has_inner_state or mc.is_attention_free, "hybrid, state-space or attention-free models"),
        (sliding, "sliding-window attention (sliding-window-only or hybrid local/global models)"),
        (mc.runner_type != "generate", f"the {mc.runner_type!r} runner (pooling or encoder-only models)"),
        (getattr(mc, "is_mm_prefix_lm", False), "prefix-LM attention (bidirectional over multimodal prefixes)"),
        (_batch_invariant(), "batch-invariant mode (VLLM_BATCH_INVARIANT=1)"),
        (vllm_config.speculative_config is not None, "speculative decoding"),
        (vllm_config.kv_transfer_config is not None, "KV connectors (--kv-transfer-config)"),
        (bool(cc.kv_offloading_size), "KV offloading"),
        (bool(cc.kv_cache_dtype_skip_layers), "--kv-cache-dtype-skip-layers (give those layers 16/16 in the map)"),
        (pc.decode_context_parallel_size > 1 or pc.prefill_context_parallel_size > 1, "context parallelism"),
        (mc.get_head_size() not in kvformat.SUPPORTED_HEAD_SIZES,
         f"head size {mc.get_head_size()} (supported: {kvformat.SUPPORTED_HEAD_SIZES})"),
    ]
    return [what for flag, what in refused if flag]


def _batch_invariant() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_BATCH_INVARIANT)


def _cpu_eager_pipeline(vllm_config) -> bool:
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    return (current_platform.is_cpu() and vllm_config.parallel_config.pipeline_parallel_size > 1
            and vllm_config.compilation_config.mode == CompilationMode.NONE
            and vllm_config.cache_config.kv_cache_memory_bytes is not None)


def check_supported(vllm_config) -> None:
    """Refuse, at startup, every model shape and vLLM feature the packed pages do not handle."""
    if _cpu_eager_pipeline(vllm_config):
        raise UnsupportedConfigError(
            "--pipeline-parallel-size > 1 with --enforce-eager on CPU: vLLM 0.32's CPU worker then skips the warm-up "
            "that allocates the pipeline's buffers, and the second stage fails at the first request (with any "
            "--kv-cache-dtype); drop --enforce-eager"
        )
    reasons = _refusals(vllm_config)
    if reasons:
        raise UnsupportedConfigError(
            f"--kv-cache-dtype {DTYPE} cannot serve {vllm_config.model_config.model}: it does not support "
            f"{'; '.join(reasons)}. Serve this model with --kv-cache-dtype auto (or fp8)."
        )


def check_ring_support(vllm_config, resolved: ResolvedMap) -> None:
    """What a map's window needs of the engine: vLLM's hybrid KV cache manager, which allocates the
    per-request rings."""
    if resolved.map.residual_length and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise UnsupportedConfigError(
            f"{resolved.source}: the map's full-precision window (residual_length {resolved.map.residual_length}) "
            "needs vLLM's hybrid KV cache manager, which is disabled: remove --disable-hybrid-kv-cache-manager "
            "(and any KV connector), or use a map with residual_length 0"
        )


def resolve_for_vllm(vllm_config) -> ResolvedMap:
    """In the process that builds the VllmConfig: refuse, resolve, validate, and hand the map on."""
    check_supported(vllm_config)
    if not isinstance(vllm_config.additional_config, dict):
        raise PrecisionMapError(f"--kv-cache-dtype {DTYPE} needs --additional-config to be a JSON object")
    options = user_options(vllm_config.additional_config)
    already = (vllm_config.additional_config.get(CONFIG_KEY) or {}).get(RESOLVED_KEY)
    if already is not None:  # a copy of a VllmConfig that was resolved before: check it, cheaply
        resolved = ResolvedMap.from_config(already)
        check(resolved, model_info(vllm_config))
        return resolved
    resolved = resolve(options, model_info(vllm_config))
    check_ring_support(vllm_config, resolved)
    for warning in resolved.warnings:
        logger.warning("kvtuner: %s", warning)
    logger.info("kvtuner: precision map from %s (%.2f average bits)", resolved.source, resolved.map.avg_bits)
    # EngineCore and the workers receive the pickled VllmConfig: they use this exact map, and the
    # map is part of VllmConfig.compute_hash() (the torch.compile cache key).
    vllm_config.additional_config[CONFIG_KEY] = {**options, RESOLVED_KEY: resolved.to_config()}
    return resolved


def resolved_map(vllm_config) -> ResolvedMap:
    options = (vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
    if RESOLVED_KEY in options:
        return ResolvedMap.from_config(options[RESOLVED_KEY])
    return resolve_for_vllm(vllm_config)  # a VllmConfig built without the platform hook


def layer_format(vllm_config, layer_name: str, head_size: int) -> kvformat.LayerFormat:
    """The packed format of one attention layer, from its index in the layer name."""
    from vllm.model_executor.models.utils import extract_layer_index

    resolved = resolved_map(vllm_config)
    index = extract_layer_index(layer_name)
    if not 0 <= index < resolved.map.num_layers:
        raise PrecisionMapError(
            f"{resolved.source}: the model has an attention layer {layer_name} (index {index}) but the map "
            f"covers layers 0-{resolved.map.num_layers - 1}; use a map calibrated for this model"
        )
    fmt = resolved.map.layer_format(index, head_size, vllm_config.model_config.dtype)
    if vllm_config.cache_config.block_size is not None:  # a worker's config, never checked in this process
        check_block_size(fmt, vllm_config.cache_config.block_size, f"{resolved.source}, layer {index}")
    return fmt


def check_layer_block_size(attention, block_size: int) -> None:
    """The layer's window and kivi groups against the block size vLLM settled on (the map was checked
    against the block size the config had, which vLLM may still change)."""
    check_block_size(attention.impl.fmt, block_size, attention.layer_name)


def bind_layer(attention) -> None:
    """At an Attention layer's construction: its packed format on the impl, and its window ring."""
    from vllm.config import get_current_vllm_config

    from kvtuner_vllm import BACKEND_NAME
    from kvtuner_vllm.backend.ring import register_ring

    if attention.attn_backend.get_name() != BACKEND_NAME:
        # vLLM's own backends would read the packed bytes as bf16 without complaint.
        raise UnsupportedConfigError(
            f"layer {attention.layer_name} got backend {attention.attn_backend.get_name()} for --kv-cache-dtype {DTYPE}"
        )
    vllm_config = get_current_vllm_config()
    fmt = layer_format(vllm_config, attention.layer_name, attention.head_size)
    ring_name = register_ring(vllm_config, attention, fmt) if fmt.has_window else None
    attention.impl.bind(fmt, ring_name)
