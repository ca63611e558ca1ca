"""Loading the model to calibrate, with the checks that turn bad input into one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration import simulate
from calibration.common import CalibrationError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the checkpoint's: what the server runs and stores 16-bit layers in
    compute_dtype: torch.dtype  # what calibration's forward passes run in (--dtype)


def read_config(model_dir: str | Path) -> dict:
    """config.json of a HF model folder, or a CalibrationError saying why the folder is not one."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CalibrationError(f"{model_dir}: no such model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except OSError:
        raise CalibrationError(f"{model_dir}: not a Hugging Face model folder (no config.json)") from None
    except ValueError as err:
        raise CalibrationError(f"{model_dir}/config.json: not valid JSON ({err})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CalibrationError(f"{model_dir}: no weights (*.safetensors or *.bin) in the folder")
    return config


def model_info(config: dict, dtype: torch.dtype, name: str, compute_dtype: torch.dtype | None = None) -> ModelInfo:
    """The KV geometry of a decoder-only causal LM with standard K/V heads, or why it is unsupported."""
    archs = config.get("architectures") or []
    if config.get("is_encoder_decoder") or not any(a.endswith("ForCausalLM") for a in archs):
        raise CalibrationError(
            f"unsupported architecture {archs or config.get('model_type')}: kvtuner calibrates decoder-only "
            "causal LMs (*ForCausalLM: Llama, Qwen2, Qwen3, Mistral families)"
        )
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    except (KeyError, TypeError):
        raise CalibrationError(f"unsupported architecture {archs}: config lacks standard attention fields") from None
    if config.get("kv_lora_rank") or config.get("q_lora_rank"):
        raise CalibrationError(f"unsupported architecture {archs}: latent (MLA) attention has no standard K/V heads")
    return ModelInfo(name, layers, int(config.get("num_key_value_heads") or heads), head_dim, dtype,
                     compute_dtype or dtype)


def inspect(model_dir: str | Path, dtype: str | None = None):
    """(tokenizer, ModelInfo) without loading weights, so bad input fails in a second, not after the load.
    `dtype` is the compute dtype (default: the checkpoint's)."""
    from transformers import AutoTokenizer

    config = read_config(model_dir)
    served = _dtype(None, config)
    info = model_info(config, served, Path(model_dir).resolve().name, _dtype(dtype, config))
    if info.head_dim % 16:
        raise CalibrationError(f"unsupported head size {info.head_dim}: the packed format needs a multiple of 16")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as err:
        raise CalibrationError(f"{model_dir}: no usable tokenizer ({str(err).splitlines()[0]})") from None
    return tokenizer, info


def load_model(model_dir: str | Path, info: ModelInfo, device: str = "cpu"):
    """The model in eval mode with the simulation attention installed (simulate.install)."""
    from transformers import AutoModelForCausalLM

    if device == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("--device cuda: no CUDA device is available")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=info.compute_dtype,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as err:
        raise CalibrationError(f"{model_dir}: transformers cannot load it ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    simulate.install(model)
    return model


def load(model_dir: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer, ModelInfo)."""
    tokenizer, info = inspect(model_dir, dtype)
    return load_model(model_dir, info, device), tokenizer, info


def _dtype(name: str | None, config: dict) -> torch.dtype:
    """`name`, else the checkpoint's dtype (what the server runs), else bf16."""
    name = name or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise CalibrationError(f"unsupported dtype {name!r}: use one of {sorted(set(DTYPES))}")
    return DTYPES[name]
