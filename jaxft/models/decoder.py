"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3 in one module.

They are one architecture (pre-norm decoder, RMSNorm, rotary attention with
grouped-query heads, SwiGLU MLP) that differ in a few switches, all in
`LlamaConfig`: q/k/v bias (Qwen2), per-head q/k RMSNorm and an explicit
head_dim (Qwen3), a sliding attention window (Mistral, optionally Qwen2/3),
RoPE scaling (Llama 3.1+), tied embeddings (Llama 3.2 1B/3B, small Qwens).

Attribute names mirror the HF module names, so a parameter's NNX path reads
like its HF name (`model.layers[0].self_attn.q_proj.kernel` <->
`model.layers.0.self_attn.q_proj.weight`); `jaxft.models.hf` relies on that.
The decoder blocks are stacked (jaxft/models/stack.py): `model.layers` holds
groups of layers whose variables have a leading layer axis, run under a scan;
`stack.layer_names` turns a group's variable into the per-layer names above.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models import kv_cache, stack
from jaxft.models.attention import ATTENTION_BACKENDS, Visibility
from jaxft.models.layers import (
    ROPE_TYPES,
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxft.sharding import constrain

# HF's per-family defaults for keys a config.json may leave out, and the
# family's fixed architecture switches.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768),
}
MODEL_TYPES = tuple(_FAMILY_DEFAULTS)

# The layout of the residual stream between blocks (names in jaxft/sharding.py RULES).
_ACTIVATION_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and precision of a Llama-family model.

    Hashable (it is static model structure under `jax.jit`): `rope_scaling` is
    kept as a `FrozenDict`, `layer_types` as a tuple.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias covers it; Qwen2's does not)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: int | None = None
    # Per-layer "full_attention" | "sliding_attention" (Qwen2/3); None = every
    # layer uses `sliding_window` when it is set (Mistral).
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    # What the backward pass recomputes instead of keeping, per decoder block (stack.REMAT_NAMES):
    # "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload".
    remat: str = "none"
    layer_loop: str = "scan"  # "scan": the blocks under one lax.scan; "unroll": a Python loop (stack.LOOPS)
    attention: str = "auto"  # the attention kernel (jaxft/models/attention.py BACKENDS)
    # 0: a language model (the output head over the vocabulary). N > 0: a sequence classifier, as transformers'
    # *ForSequenceClassification: a `score` head to N labels over each row's last real token, no vocabulary head.
    num_labels: int = 0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        if isinstance(self.remat, bool):  # the old switch: True was "recompute the whole block"
            set_("remat", "full" if self.remat else "none")
        if self.remat not in stack.REMAT_NAMES:
            raise ConfigError(f"remat={self.remat!r} is not a remat policy; choose one of "
                              f"{', '.join(stack.REMAT_NAMES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention={self.attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.layer_loop not in stack.LOOPS:
            raise ConfigError(f"layer_loop={self.layer_loop!r}; choose one of {', '.join(stack.LOOPS)}")
        if self.rope_scaling is not None:
            set_("rope_scaling", FrozenDict(self.rope_scaling))
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ConfigError(
                    f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
                )
        if self.layer_types is not None:
            set_("layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Build from a HF `config.json` dict (transformers 4.x or 5.x layout).

        4.x keeps `rope_theta` and `rope_scaling` at the top level; 5.x nests
        both in `rope_parameters`. `overrides` replace fields afterwards
        (e.g. `dtype=jnp.bfloat16, remat=True`).
        """
        hf = dict(hf_config)
        model_type = hf.get("model_type", "llama")
        if model_type not in _FAMILY_DEFAULTS:
            raise ModelLoadError(
                f"model_type {model_type!r} is not a Llama-family model; "
                f"supported: {', '.join(MODEL_TYPES)}"
            )
        defaults = _FAMILY_DEFAULTS[model_type]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported; supported: 'silu'")

        # RoPE: 5.x `rope_parameters` holds theta and the scaling; 4.x splits them.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if not rope_params:
            rope_params = dict(hf.get("rope_scaling") or {})
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(
                f"rope type {rope_type!r} in {model_type} config is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "type"}
            rope_scaling["rope_type"] = rope_type
            if rope_type == "llama3":
                rope_scaling.setdefault(
                    "original_max_position_embeddings",
                    hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")),
                )

        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads

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
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get(
                "max_position_embeddings", defaults["max_position_embeddings"]
            ),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=tuple(layer_types) if layer_types else None,
            model_type=model_type,
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown LlamaConfig override(s) {sorted(unknown)}; "
                f"valid: {sorted(f.name for f in dataclasses.fields(cls))}"
            )
        if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
            fields["num_labels"] = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        fields.update(overrides)
        return cls(**fields)


def _dense(cfg: LlamaConfig, n_in, n_out, bias, axes, rngs) -> Linear:
    return Linear(
        n_in, n_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axes=axes, rngs=rngs
    )


def _norm(cfg: LlamaConfig, dim: int, rngs) -> RMSNorm:
    return RMSNorm(dim, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = _dense(cfg, cfg.hidden_size, q_dim, bias, ("embed", "heads"), rngs)
        self.k_proj = _dense(cfg, cfg.hidden_size, kv_dim, bias, ("embed", "kv_heads"), rngs)
        self.v_proj = _dense(cfg, cfg.hidden_size, kv_dim, bias, ("embed", "kv_heads"), rngs)
        self.o_proj = _dense(cfg, q_dim, cfg.hidden_size, cfg.o_bias, ("heads", "embed"), rngs)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, cfg.head_dim, rngs)
            self.k_norm = _norm(cfg, cfg.head_dim, rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, visibility: Visibility, window_index=None, cache=None, cache_index=None):
        """The attention output for `x` `[B, T, hidden]`. With `cache` (this layer's keys and values
        `[B, K, slots, D]`, jaxft/models/kv_cache.py) the new keys and values are written at slots
        `[cache_index, cache_index + T)` and the queries attend over the cache: returns `(out, cache)`."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = visibility.attend(q, k, v, scale=self.head_dim**-0.5, window_index=window_index)
        else:
            cache = kv_cache.write(*cache, k, v, cache_index)
            out = visibility.attend_cache(q, *cache, scale=self.head_dim**-0.5, window_index=window_index)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out if cache is None else (out, cache)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _dense(cfg, h, m, bias, ("embed", "mlp"), rngs)
        self.up_proj = _dense(cfg, h, m, bias, ("embed", "mlp"), rngs)
        self.down_proj = _dense(cfg, m, h, bias, ("mlp", "embed"), rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)
        self.input_layernorm = _norm(cfg, cfg.hidden_size, rngs)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size, rngs)

    def __call__(self, x, cos, sin, visibility: Visibility, window_index=None, cache=None, cache_index=None):
        """The block's output; with a `cache`, `(output, cache)` (see `LlamaAttention`)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, visibility, window_index, cache, cache_index)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        # One stacked group of every layer; methods may split it (stack.regroup).
        make_layer = lambda key: LlamaDecoderLayer(cfg, rngs=nnx.Rngs(key))  # noqa: E731
        self.layers = nnx.List([stack.build_group(make_layer, range(cfg.num_layers), rngs.params())])
        self.norm = _norm(cfg, cfg.hidden_size, rngs)


class LlamaForCausalLM(nnx.Module):
    """Decoder-only language model; `__call__` returns float32 logits `[B, T, vocab]`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if config.tie_word_embeddings or config.num_labels:
            self.lm_head = None  # logits come from model.embed_tokens.attend (a classifier has none)
        else:
            self.lm_head = _dense(
                config, config.hidden_size, config.vocab_size, False, ("embed", "vocab"), rngs
            )
        # A sequence classifier's head (transformers names it `score`); None in a language model.
        self.score = (_dense(config, config.hidden_size, config.num_labels, False, ("embed", None), rngs)
                      if config.num_labels else nnx.data(None))
        # Prompt tuning (jaxft/peft/prompt.py) sets this to a module holding the virtual
        # token embeddings. Declared as data so a module can be assigned to it later.
        self.prompt_encoder = nnx.data(None)

    def __call__(self, input_ids, **kwargs):
        """Float32 logits `[B, T, vocab]` for `input_ids` `[B, T]`; arguments as `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, **kwargs))

    def hidden_states(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                      right_padded: bool = False):
        """The final normed hidden states `[B, T, hidden]` for `input_ids` `[B, T]` (what the head reads).

        attention_mask: `[B, T]`, 1 = real token, 0 = padding (masked as a key).
        positions: `[B, T]` RoPE positions; default `arange(T)`. Left-padded or
            packed rows should pass their own (packing: restart at each segment).
        segment_ids: `[B, T]` ints for packed rows; a token attends only to
            earlier tokens of its own segment; 0 marks padding.
        right_padded: a promise that padding only ever ends a row (as jaxft's batches do): then
            causal order alone keeps every real token from seeing it, and attention drops the
            padding mask (the fused kernels run unmasked; padding rows' outputs are unspecified).

        With `prompt_encoder` set, its virtual tokens precede every row and every
        segment; the output still covers the T input positions only.
        """
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(self.model.embed_tokens(input_ids), _ACTIVATION_AXES)
        windows = self._windows()
        kv_mask, dense_masks = (None if right_padded else attention_mask), None
        if self.prompt_encoder is not None:
            # Prompt tuning puts virtual tokens in front: a longer x, shifted positions, padding that
            # every token may see past, and for packed rows a mask no kernel expresses. Their outputs
            # are dropped below.
            x, positions, kv_mask, dense_mask_for = self.prompt_encoder(x, kv_mask, positions, segment_ids)
            if dense_mask_for is not None:
                dense_masks, segment_ids = tuple(dense_mask_for(w) for w in windows), None
        visibility = Visibility(windows, cfg.attention, segment_ids=segment_ids, kv_mask=kv_mask,
                                dense_masks=dense_masks)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

        def block(layer, x, inputs):
            # Between blocks activations are split over the batch only: each block's weights are
            # gathered (FSDP) or its partial sums reduced (tensor parallelism) inside it.
            return constrain(layer(x, cos, sin, visibility, inputs.get("window")), _ACTIVATION_AXES)

        x = stack.run(self.model.layers, x, block, self._window_per_layer(windows), loop=cfg.layer_loop,
                      remat=cfg.remat)
        return self.model.norm(x[:, -t:])  # the T input positions only

    def cached_hidden_states(self, input_ids, cache: kv_cache.KVCache, *, attention_mask, positions,
                             prompt: bool = False):
        """A pass of generation (jaxft/generate/decode.py): `input_ids` `[B, T]` run at the cache's next T slots,
        attending to every earlier slot that holds a token. Returns the final normed hidden states
        `[B, T, hidden]` and the cache with the T tokens' keys and values written.

        attention_mask: `[B, T]`, 1 = real token, 0 = a left-padded prompt's padding (never attended to).
        positions: `[B, T]` RoPE positions: the number of real tokens before each one.
        prompt: this pass is the prompt's: with prompt tuning its virtual tokens go first (taking the
            cache's first slots), and every position, now and later, moves up by their number, as in training.
        """
        cfg = self.config
        x = constrain(self.model.embed_tokens(input_ids), _ACTIVATION_AXES)
        if self.prompt_encoder is not None:
            if prompt:
                x, positions, attention_mask, _ = self.prompt_encoder(x, attention_mask, positions, None)
            else:
                positions = positions + self.prompt_encoder.num_virtual_tokens
        t = x.shape[1]
        windows = self._windows()
        cache = cache.admit(attention_mask)
        # Queries and keys differ in length, so order is in the masks.
        visibility = Visibility(windows, dense_masks=cache.visibility_masks(t, windows))
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

        def block(layer, x, inputs, layer_cache):
            x, layer_cache = layer(x, cos, sin, visibility, inputs.get("window"), layer_cache, cache.index)
            return constrain(x, _ACTIVATION_AXES), layer_cache

        x, caches = stack.run(self.model.layers, x, block, self._window_per_layer(windows), loop=cfg.layer_loop,
                              caches=list(zip(cache.keys, cache.values)))
        cache = cache.advanced(t, [k for k, _ in caches], [v for _, v in caches])
        return self.model.norm(x[:, t - input_ids.shape[1]:]), cache

    def _windows(self) -> tuple:
        """The distinct sliding windows of the layers (None: full attention), in a fixed order."""
        cfg = self.config
        return tuple(sorted({cfg.layer_window(i) for i in range(cfg.num_layers)}, key=lambda w: w or 0))

    def _window_per_layer(self, windows: tuple) -> dict:
        """Where layers differ in their window (Qwen2/3 layer_types), each layer's index into `windows`, as
        data the layer loop hands each layer."""
        cfg = self.config
        if len(windows) == 1:
            return {}
        return {"window": np.array([windows.index(cfg.layer_window(i)) for i in range(cfg.num_layers)])}

    def classify(self, input_ids, *, attention_mask=None, positions=None, right_padded: bool = False):
        """Float32 label logits `[B, num_labels]` of a sequence classifier: the `score` head over each row's
        last real token (the last 1 of `attention_mask`; the last position without one), as transformers'
        *ForSequenceClassification pools the rightmost token that is not padding. Arguments as `hidden_states`."""
        if self.score is None:
            raise ConfigError("classify needs a sequence classifier (config.num_labels > 0); this is a language "
                              "model: use logits()")
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions,
                                    right_padded=right_padded)
        b, t = input_ids.shape
        if attention_mask is None:
            last = jnp.full((b,), t - 1)
        else:
            last = jnp.max(jnp.where(attention_mask > 0, jnp.arange(t), 0), axis=1)
        return self.score(hidden[jnp.arange(b), last]).astype(jnp.float32)

    def output_head(self):
        """`(apply, params)`: the language-model head as a pure function of its parameters, `apply(params,
        hidden) -> logits` in the compute dtype (the untied `lm_head`, or the embedding's `attend` when tied),
        so a loss can run it over chunks of tokens (jaxft/losses.py)."""
        self._check_language_model()
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        graphdef, params = nnx.split(head)
        if self.lm_head is None:
            return (lambda p, h: nnx.merge(graphdef, p).attend(h)), params
        return (lambda p, h: nnx.merge(graphdef, p)(h)), params

    def logits(self, hidden):
        """Float32 logits `[B, T, vocab]` of final hidden states `[B, T, hidden]`."""
        self._check_language_model()
        head = self.model.embed_tokens.attend if self.lm_head is None else self.lm_head
        return head(hidden).astype(jnp.float32)

    def _check_language_model(self):
        if self.config.num_labels:
            raise ConfigError(f"this model is a sequence classifier ({self.config.num_labels} labels): it has no "
                              "vocabulary head to give token logits; use classify()")
