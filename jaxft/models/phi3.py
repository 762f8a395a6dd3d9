"""Phi-3 and Phi-3.5 (and Phi-4-mini, the same architecture), as switches of the shared decoder
(jaxft/models/decoder.py).

What makes Phi-3 Phi-3: q, k and v come from one fused projection `qkv_proj` and the MLP's gate and up from one
`gate_up_proj` (gate first); those are the HF tensors, the LoRA targets and the names PEFT writes. The 128k
models scale RoPE with LongRoPE (per-frequency factors, short and long sets, layers.Rope); Phi-4-mini rotates
only part of each head (`partial_rotary_factor`). No biases anywhere, an untied head unless the config ties it.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxft.errors import ModelLoadError
from jaxft.models.decoder import DecoderConfig, build_config, check_activation, rope_from_hf, shape_fields

MODEL_TYPES = ("phi3",)


def from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a Phi-3 `config.json` dict (transformers 4.x or 5.x layout)."""
    hf = _legacy_rope_names(dict(hf))
    if hf.get("model_type") not in MODEL_TYPES:
        raise ModelLoadError(f"model_type {hf.get('model_type')!r} is not Phi-3; supported: {', '.join(MODEL_TYPES)}")
    rope_theta, rope_scaling = rope_from_hf(hf)
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    fields = dict(
        **shape_fields(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        partial_rotary_factor=float(partial),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window"),
        model_type="phi3",
        hidden_act=check_activation(hf, "hidden_act", "silu"),
        fused_qkv=True,
        fused_gate_up=True,
    )
    return build_config(hf, fields, overrides)


def _legacy_rope_names(hf: dict) -> dict:
    # Early Phi-3 configs call LongRoPE "su" (and some "yarn"); transformers reads both as longrope.
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) in ("su", "yarn"):
            hf[key] = {**{k: v for k, v in params.items() if k != "type"}, "rope_type": "longrope"}
    return hf
