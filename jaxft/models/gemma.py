"""Gemma 1, 2 and 3 (text), as switches of the shared decoder (jaxft/models/decoder.py).

What makes Gemma Gemma: embeddings multiplied by sqrt(hidden_size), a GeGLU MLP (tanh-approximated gelu),
RMSNorms that scale by `1 + weight`, a head tied to the embedding. Gemma 2 adds norms after attention and MLP
(`pre_feedforward_layernorm`, `post_feedforward_layernorm`), scores scaled by `query_pre_attn_scalar`,
tanh soft-capping of attention scores and final logits, and layers alternating between a sliding window and
global attention. Gemma 3 drops the soft-capping, adds per-head q/k norms, gives its sliding (local) layers a
RoPE base of their own and keeps the RoPE scaling for the global ones. HF tensor names are the decoder's own.

Gemma 3's multimodal checkpoints (`model_type` "gemma3", a vision tower beside the language model) are not read:
the text models (1B, and any `Gemma3ForCausalLM`) are `gemma3_text`.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxft.errors import ModelLoadError
from jaxft.models.decoder import DecoderConfig, build_config, check_activation, rope_from_hf, shape_fields

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a Gemma 1/2/3 `config.json` dict (transformers 4.x or 5.x layout)."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"model_type {model_type!r} is not a Gemma text model; supported: "
                             f"{', '.join(MODEL_TYPES)}")
    if hf.get("use_bidirectional_attention"):
        raise ModelLoadError("this Gemma config asks for bidirectional attention (an embedding model); only the "
                             "causal language models are supported")
    generation = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[model_type]
    layers = hf["num_hidden_layers"]
    fields = dict(
        **shape_fields(hf, default_head_dim=256),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 8192 if generation < 3 else 131072),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        model_type=model_type,
        hidden_act=_activation(hf),
        norm_offset=1.0,
        embed_scale=True,
    )
    if generation < 3:  # one RoPE for every layer
        fields["rope_theta"], fields["rope_scaling"] = rope_from_hf(hf)
    if generation > 1:
        fields.update(
            sandwich_norms=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            sliding_window=hf.get("sliding_window", 4096),
            layer_types=tuple(hf.get("layer_types") or _default_layer_types(generation, layers, hf)),
        )
    if generation == 2:
        fields.update(
            attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping", 50.0)),
            final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", 30.0)),
        )
    if generation == 3:
        fields.update(qk_norm=True, attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
                      final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
                      **_gemma3_rope(hf))
    return build_config(hf, fields, overrides)


def _activation(hf) -> str:
    # Gemma 1 checkpoints say "gelu" but mean the tanh approximation (transformers rewrites it so too);
    # Gemma 2/3 name the key hidden_activation.
    act = check_activation(hf, "hidden_activation", hf.get("hidden_act") or "gelu_pytorch_tanh")
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _default_layer_types(generation: int, layers: int, hf) -> list[str]:
    # transformers' defaults when config.json has no layer_types: Gemma 2 alternates starting with a sliding
    # layer; Gemma 3 makes every sliding_window_pattern-th layer global (6 by default).
    every = 2 if generation == 2 else int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]


def _gemma3_rope(hf) -> dict:
    """Gemma 3's two RoPEs: the global layers' (theta and scaling) and the local layers' base."""
    per_type = hf.get("rope_parameters") or {}
    if "full_attention" in per_type:  # transformers 5.x: one parameter set per layer type
        theta, scaling = rope_from_hf(hf, per_type["full_attention"])
        local = dict(per_type.get("sliding_attention") or {})
        local_theta, local_scaling = rope_from_hf(hf, {"rope_theta": 10000.0, **local})
        if local_scaling is not None:
            raise ModelLoadError(f"Gemma 3 local layers with rope type {local_scaling['rope_type']!r} are not "
                                 "supported (the released models use plain RoPE there)")
    else:  # 4.x: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq for local ones
        theta, scaling = rope_from_hf({"rope_theta": 1_000_000.0, **hf})
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
