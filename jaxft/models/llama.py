"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3, as switches of the shared decoder
(jaxft/models/decoder.py): q/k/v biases (Qwen2), per-head q/k norms and an explicit head_dim (Qwen3), a sliding
attention window (Mistral, optionally Qwen2/3), RoPE scaling (Llama 3.1+), tied embeddings (Llama 3.2 1B/3B,
small Qwens). HF tensor names are the decoder's own (`model.layers.N.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxft.errors import ModelLoadError
from jaxft.models.decoder import DecoderConfig, build_config, check_activation, rope_from_hf, shape_fields

# HF's per-model-type defaults for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768),
}
MODEL_TYPES = tuple(_DEFAULTS)


def from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a Llama, Mistral, Qwen2 or Qwen3 `config.json` dict (transformers 4.x or 5.x
    layout); `overrides` replace fields afterwards (e.g. `dtype=jnp.bfloat16, remat="full"`)."""
    hf = dict(hf)
    model_type = hf.get("model_type", "llama")
    if model_type not in _DEFAULTS:
        raise ModelLoadError(f"model_type {model_type!r} is not a Llama-family model; "
                             f"supported: {', '.join(MODEL_TYPES)}")
    defaults = _DEFAULTS[model_type]
    rope_theta, rope_scaling = rope_from_hf(hf)

    if model_type == "qwen2":
        attention_bias, o_bias = True, False
    elif model_type == "mistral":
        attention_bias = o_bias = False
    else:  # llama, qwen3: attention_bias covers o_proj too
        attention_bias = o_bias = bool(hf.get("attention_bias", False))

    sliding_window, layer_types = None, None
    if model_type == "mistral":
        sliding_window = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        sliding_window = hf.get("sliding_window")
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]

    fields = dict(
        **shape_fields(hf),
        rms_norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types else None,
        model_type=model_type,
        hidden_act=_only_silu(hf),
    )
    return build_config(hf, fields, overrides)


def _only_silu(hf) -> str:
    act = check_activation(hf, "hidden_act", "silu")
    if act != "silu":  # the Llama family is SwiGLU; another activation means a modified model
        raise ModelLoadError(f"hidden_act {act!r} is not supported; supported: 'silu'")
    return act
