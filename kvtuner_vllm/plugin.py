"""vLLM entry point (`vllm.general_plugins`): makes `--kv-cache-dtype kvtuner` work.

vLLM calls `register()` in every process it starts: in the API server before the CLI parser is
built, then in EngineCore and in each worker (they are spawned, so nothing patched in the parent
survives). `register()` is idempotent and imports no kernels. It installs:

1. the dtype: `kvtuner` becomes a valid CacheDType (CLI choices, pydantic schema, the selector's
   assert) that maps to torch.uint8 pages;
2. the backend: a dynamic `KVTUNER` enum member (only for `AttentionBackendEnum[get_name()]`; it
   is never stored in VllmConfig, since a dynamic member does not unpickle in a fresh process),
   and a wrap of the platform's `get_attn_backend_cls` that routes this dtype, and only it, to
   our CPU or CUDA backend (vLLM CPU ignores --attention-backend);
3. the map: a wrap of the platform's `check_and_update_config` resolves and validates the
   precision map in the process that builds the VllmConfig (the API server), before any engine
   process starts, and refuses unsupported models; the result travels in additional_config;
4. the pages: a wrap of `Attention.get_kv_cache_spec` gives each layer its own bytes per token
   (one block table for all layers through UniformTypeKVCacheSpecs) and stamps the layer's
   format on its impl;
5. the log: a wrap of `update_kv_cache_capacity` logs the map and the capacity next to vLLM's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import get_args

DTYPE = "kvtuner"
BACKEND_NAME = "KVTUNER"
CPU_BACKEND = "kvtuner_vllm.backend.cpu.KVTunerCPUBackend"
CUDA_BACKEND = "kvtuner_vllm.backend.cuda.KVTunerCUDABackend"
_WRAPPED = "_kvtuner_wrapped"  # marks our wrappers so a second register() does not stack them

logger = logging.getLogger("vllm.kvtuner")


class UnsupportedConfigError(ValueError):
    """A model or vLLM feature this dtype cannot serve; raised at startup, never at run time."""


def register() -> None:
    _check_vllm_version()
    _register_dtype()
    _register_backend()
    _wrap_platform()
    _wrap_attention_spec()
    _wrap_capacity_log()


def _check_vllm_version() -> None:
    import vllm

    from kvtuner_vllm import SUPPORTED_VLLM

    if vllm.__version__.split("+")[0].split(".")[:2] != SUPPORTED_VLLM.split(".")[:2]:
        raise RuntimeError(
            f"kvtuner-vllm supports vLLM {SUPPORTED_VLLM} only (it patches vLLM internals that change "
            f"between releases), but vLLM {vllm.__version__} is installed; install vllm=={SUPPORTED_VLLM}"
        )


# -- 1. the dtype ---------------------------------------------------------------------------------


def _register_dtype() -> None:
    import pydantic
    import torch
    import vllm.config.cache as cache_module
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.attention.selector as selector
    from vllm.config.cache import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    # Packed pages are raw bytes; the dict entry also satisfies every kv_cache_dtype_str_to_dtype.
    STR_DTYPE_TO_TORCH_DTYPE[DTYPE] = torch.uint8
    if DTYPE in get_args(cache_module.CacheDType):
        return
    from typing import Literal

    widened = Literal[(*get_args(cache_module.CacheDType), DTYPE)]
    cache_module.CacheDType = widened
    CacheConfig.__dataclass_fields__["cache_dtype"].type = widened
    CacheConfig.__annotations__["cache_dtype"] = widened
    pydantic.dataclasses.rebuild_dataclass(CacheConfig, force=True)
    selector.CacheDType = widened  # the selector asserts membership on its own global
    arg_utils._compute_kwargs.cache_clear()  # argparse choices are computed once and cached


# -- 2. the backend -------------------------------------------------------------------------------


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, CPU_BACKEND)


def backend_path() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CPU_BACKEND
    if current_platform.is_cuda():
        return CUDA_BACKEND
    raise UnsupportedConfigError(
        f"--kv-cache-dtype {DTYPE} runs on CPU and NVIDIA CUDA only, not on {current_platform.device_name}"
    )


def _route(original, selected_backend, attn_selector_config, num_heads=None):
    if attn_selector_config.kv_cache_dtype != DTYPE:
        return original(selected_backend, attn_selector_config, num_heads)
    cfg = attn_selector_config
    refused = [
        (cfg.use_mla, "MLA attention"),
        (cfg.use_sparse, "sparse attention"),
        (cfg.has_sliding_window, "sliding-window attention"),
        (cfg.has_sink, "attention sinks"),
        (cfg.attn_type != "decoder", f"{cfg.attn_type} attention"),
    ]
    for flag, what in refused:
        if flag:
            raise UnsupportedConfigError(
                f"--kv-cache-dtype {DTYPE} does not support {what}; serve with --kv-cache-dtype auto"
            )
    return backend_path()


def _wrap_platform() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if not getattr(platform_cls.get_attn_backend_cls, _WRAPPED, False):
        platform_cls.get_attn_backend_cls = _routing(platform_cls.get_attn_backend_cls)
    if not getattr(platform_cls.check_and_update_config, _WRAPPED, False):
        platform_cls.check_and_update_config = _resolving(platform_cls.check_and_update_config)


def _routing(original):
    """Platform.get_attn_backend_cls that sends this dtype to our backend; `original` is bound."""

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        return _route(original, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _WRAPPED, True)
    return classmethod(get_attn_backend_cls)


def _resolving(original):
    """Platform.check_and_update_config that also resolves and validates the precision map."""

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        if vllm_config.cache_config.cache_dtype == DTYPE:
            from kvtuner_vllm.vllm_config import resolve_for_vllm

            resolve_for_vllm(vllm_config)

    setattr(check_and_update_config, _WRAPPED, True)
    return classmethod(check_and_update_config)


# -- 4. per-layer pages ---------------------------------------------------------------------------


def _wrap_attention_spec() -> None:
    import torch
    from vllm.model_executor.layers.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or self.kv_cache_dtype != DTYPE:
            return spec
        from kvtuner_vllm.vllm_config import layer_format

        if self.attn_backend.get_name() != BACKEND_NAME:
            # vLLM's own backends would read the packed bytes as bf16 without complaint.
            raise UnsupportedConfigError(
                f"layer {self.layer_name} got backend {self.attn_backend.get_name()} for --kv-cache-dtype {DTYPE}"
            )
        fmt = layer_format(vllm_config, self.layer_name, self.head_size, self.num_kv_heads)
        self.impl.fmt = fmt
        return dataclasses.replace(spec, state_content_bytes=fmt.bytes_per_token, dtype=torch.uint8)

    setattr(get_kv_cache_spec, _WRAPPED, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec


# -- 5. the capacity log --------------------------------------------------------------------------


def _wrap_capacity_log() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    original = kv_cache_utils.update_kv_cache_capacity
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def update_kv_cache_capacity(vllm_config, kv_cache_config) -> None:
        original(vllm_config, kv_cache_config)
        if vllm_config.cache_config.cache_dtype == DTYPE:
            from kvtuner_vllm.vllm_config import log_startup_block

            log_startup_block(vllm_config, kv_cache_config)

    setattr(update_kv_cache_capacity, _WRAPPED, True)
    kv_cache_utils.update_kv_cache_capacity = update_kv_cache_capacity
    # EngineCore imports the function by name: replace its reference too if it is already imported
    # (in the EngineCore process it is; importing it here would slow the API server's start).
    engine_core = sys.modules.get("vllm.v1.engine.core")
    if engine_core is not None:
        engine_core.update_kv_cache_capacity = update_kv_cache_capacity
