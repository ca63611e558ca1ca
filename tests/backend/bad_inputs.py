"""The bad inputs kvtuner must refuse at startup, each with the fragments its message must hold:
maps that cannot be used, engine options that do not fit, and the model kinds the kernels do not
compute (config-only stand-ins: vLLM resolves them from config.json alone, before any weight is read).
Shared by test_refusals.py (in-process, every case) and test_e2e_bad_input.py (`vllm serve`, a few)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from conftest import kvtuner_args, write_map

TINY_LAYERS = 4
MLA = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "kv_lora_rank": 64,
       "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64,
       "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
       "first_k_dense_replace": 4, "moe_layer_freq": 1}
HYBRID = {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "attn_layer_period": 2,
          "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 1,
          "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 16}
KVTUNER = ["--kv-cache-dtype", "kvtuner"]
AUTO_FIX = "--kv-cache-dtype auto"


@dataclass
class Case:
    model: Path
    args: list[str]  # `vllm serve` arguments after the model
    fragments: list[str]  # what the error message must contain
    env: dict[str, str] = field(default_factory=dict)


def variant(tiny: Path, dest: Path, **config) -> Path:
    """A copy of the tiny model with config.json changes (weights linked: loading never starts)."""
    dest.mkdir()
    for item in tiny.iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item)
    data = json.loads((tiny / "config.json").read_text())
    data.update(config)
    (dest / "config.json").write_text(json.dumps(data))
    return dest


def cases(tiny: Path, tmp: Path) -> dict[str, Case]:
    def map_args(name: str, **kwargs) -> list[str]:
        return kvtuner_args(write_map(tmp / name, **{"pairs": [(4, 4)] * TINY_LAYERS, **kwargs}))

    malformed = tmp / "malformed.json"
    malformed.write_text('{"format": "kvtuner-precision-map/v2", "layers": [')
    bad_bits = write_map(tmp / "bits.json", [(4, 4), (4, 4), (3, 4), (4, 4)])
    window = map_args("window.json", residual_length=32)
    return {
        "unreadable": Case(tiny, kvtuner_args(tmp / "missing.json"), ["missing.json", "cannot read it"]),
        "malformed": Case(tiny, kvtuner_args(malformed), ["malformed.json", "not valid JSON or YAML"]),
        "layers": Case(tiny, map_args("layers.json", pairs=[(4, 4)] * 30),
                       ["layers.json", "the map has 30 layers but the model has 4", "calibrated for this model"]),
        "bits": Case(tiny, kvtuner_args(bad_bits), ["bits.json", "layer 2 key_bits", "(2, 4, 8, 16)"]),
        "group_size": Case(tiny, map_args("group.json", group_size=128),
                           ["group.json", "group size 128 does not divide head size 64", "choose a group size"]),
        "scheme": Case(tiny, map_args("scheme.json", scheme="per-channel-keys"),
                       ["scheme.json", "scheme", "'per-token-group', 'kivi'"]),
        "kivi_group": Case(tiny, map_args("kivi.json", scheme="kivi", residual_length=32),
                           ["kivi.json", "kivi scheme needs key_group_size"]),
        "window_block": Case(tiny, window + ["--block-size", "16"],
                             ["window.json", "residual_length 32 exceeds the block size 16", "--block-size"]),
        "window_hybrid_manager": Case(tiny, window + ["--disable-hybrid-kv-cache-manager"],
                                      ["window.json", "hybrid KV cache manager", "--disable-hybrid-kv-cache-manager"]),
        "other_model": Case(tiny, map_args("other.json", model="Qwen2.5-7B-Instruct"),
                            ["other.json", "made for model 'Qwen2.5-7B-Instruct'", "calibrated for this model"]),
        "unknown_option": Case(tiny, KVTUNER + ["--additional-config", json.dumps({"kvtuner": {"precison_map": "x"}})],
                               ["unknown key(s) ['precison_map']", "known keys"]),
        "head_size": Case(variant(tiny, tmp / "head32", head_dim=32), KVTUNER, ["head size 32", AUTO_FIX]),
        "sliding_window": Case(variant(tiny, tmp / "sliding", sliding_window=64), KVTUNER,
                               ["sliding-window attention", AUTO_FIX]),
        "mla": Case(variant(tiny, tmp / "mla", **MLA), KVTUNER, ["MLA attention", AUTO_FIX]),
        "hybrid": Case(variant(tiny, tmp / "jamba", **HYBRID), KVTUNER, ["hybrid, state-space", AUTO_FIX]),
        "encoder_only": Case(tiny, KVTUNER + ["--runner", "pooling"], ["'pooling' runner", AUTO_FIX]),
        "spec_decode": Case(tiny, KVTUNER + ["--speculative-config", json.dumps(
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})],
            ["speculative decoding", AUTO_FIX]),
        "batch_invariant": Case(tiny, KVTUNER, ["batch-invariant mode", AUTO_FIX], {"VLLM_BATCH_INVARIANT": "1"}),
        "eager_pipeline": Case(tiny, KVTUNER + ["--pipeline-parallel-size", "2"],
                               ["--pipeline-parallel-size > 1 with --enforce-eager on CPU", "drop --enforce-eager"]),
    }
