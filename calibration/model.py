"""Loading the model to calibrate, with the checks that turn bad input into one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
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
    matmul_dtype: torch.dtype | None = None  # the decoder layers' matrix products, where not compute_dtype


def matmul_dtype(name: str, info: ModelInfo) -> torch.dtype | None:
    """--matmul-dtype: "auto" multiplies in bfloat16 where the checkpoint is bfloat16 and the activations are wider
    (its weights are then exact in bfloat16, and only the products' inputs and outputs round); None: compute dtype."""
    if name == "auto":
        wanted = torch.bfloat16 if info.dtype == torch.bfloat16 else None
    else:
        wanted = DTYPES[name]
    return None if wanted in (None, info.compute_dtype) else wanted


class LowPrecisionLinear(torch.nn.Module):
    """A decoder layer's Linear whose product runs in `dtype` (bfloat16: the CPU's AVX512-BF16/AMX or the GPU's
    tensor cores, accumulating in float32) and returns the activations' dtype. Everything else, the residual stream,
    norms, the simulated quantization, attention and the vocabulary projection, stays in the compute dtype.

    Why: on 2 CPU cores a float32 forward of a 1.5B model is GEMM-bound (~130 GFLOP/s measured on AVX-512); bfloat16
    products run ~2.7x faster there. The reference pass makes the same roundings, so a map's KL measures the map."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(dtype),
                                                                         requires_grad=False)
        self.exact = False  # exact_products: the product in the activations' dtype, as the unlowered model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:  # the weights widen exactly, so this is the original Linear's product
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


@contextlib.contextmanager
def exact_products(model: torch.nn.Module) -> Iterator[None]:
    """Context: every LowPrecisionLinear multiplies in the activations' dtype (float32), so the model computes what
    it computed before lower_matmuls, for a checkpoint whose weights the low dtype holds exactly. What a report
    states is measured this way; the search and the choice use the fast products."""
    lowered = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    for module in lowered:
        module.exact = True
    try:
        yield
    finally:
        for module in lowered:
            module.exact = False


def lower_matmuls(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every Linear inside the decoder layers (not the vocabulary projection, whose rounding would blur the
    KL) by a LowPrecisionLinear; returns how many."""
    from calibration.capture import decoder_layers

    replaced = 0
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, LowPrecisionLinear(child, dtype))
                    replaced += 1
    return replaced


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


def inspect(model_dir: str | Path, dtype: str | None = None, matmuls: str | None = None):
    """(tokenizer, ModelInfo) without loading weights, so bad input fails in a second, not after the load.
    `dtype` is the compute dtype (default: the checkpoint's), `matmuls` the decoder products' (see matmul_dtype;
    default: the compute dtype)."""
    from transformers import AutoTokenizer

    config = read_config(model_dir)
    served = _dtype(None, config)
    info = model_info(config, served, Path(model_dir).resolve().name, _dtype(dtype, config))
    if matmuls is not None:
        info = dataclasses.replace(info, matmul_dtype=matmul_dtype(matmuls, info))
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
    if info.matmul_dtype is not None:
        lower_matmuls(model, info.matmul_dtype)
    simulate.install(model)
    return model


def load(model_dir: str | Path, device: str = "cpu", dtype: str | None = None, matmuls: str | None = None):
    """(model, tokenizer, ModelInfo)."""
    tokenizer, info = inspect(model_dir, dtype, matmuls)
    return load_model(model_dir, info, device), tokenizer, info


def _dtype(name: str | None, config: dict) -> torch.dtype:
    """`name`, else the checkpoint's dtype (what the server runs), else bf16."""
    name = name or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise CalibrationError(f"unsupported dtype {name!r}: use one of {sorted(set(DTYPES))}")
    return DTYPES[name]
