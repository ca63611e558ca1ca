"""Models for tests, materialized once into the kvtuner cache (${KVTUNER_CACHE:-~/.cache/kvtuner-vllm})
with the same process-safe lock-and-rename as the bundled SmolLM2 (kvtuner_vllm.bundled_models).

* `smollm2_dir()`: the real SmolLM2-135M-Instruct, bf16 (30 layers, head size 64, 3 KV heads).
* `tiny_llama_dir(head_size)`: a tiny random Llama (4 layers, hidden 256, 2 KV heads, bf16, fixed
  seed) with SmolLM2's tokenizer and chat template, so vLLM can serve it; head_size 64 or 128.
  Its weights are initialized wider than transformers' default (std 0.1, not 0.02), so its greedy
  continuations vary from token to token instead of repeating one token.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvtuner_vllm import bundled_models

TINY_LAYERS = 4
TINY_HIDDEN = 256
TINY_KV_HEADS = 2
TINY_Q_HEADS = 4
TINY_SEED = 0
TINY_INIT_STD = 0.1
TINY_VERSION = 2  # bump when the recipe changes


def smollm2_dir() -> Path:
    return bundled_models.materialize("smollm2")


def tiny_llama_config(head_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 512,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_Q_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "head_dim": head_size,
        "vocab_size": 49152,  # SmolLM2's tokenizer
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "initializer_range": TINY_INIT_STD,
    }


def _build_tiny(head_size: int, dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TINY_SEED)
    config = LlamaConfig(**tiny_llama_config(head_size))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(dest))
    bundled_models.save_tokenizer(dest)
    saved = json.loads((dest / "config.json").read_text())
    assert saved["head_dim"] == head_size and saved["architectures"] == ["LlamaForCausalLM"], saved


def tiny_llama_dir(head_size: int = 64) -> Path:
    if head_size not in (64, 128):
        raise ValueError(f"tiny models come with head size 64 or 128, not {head_size}")
    target = bundled_models.cache_root() / f"tiny-llama-h{head_size}"
    return bundled_models.materialize_once(target, lambda dest: _build_tiny(head_size, dest), version=TINY_VERSION)
