"""The pre-norm rotary decoder every causal-LM family here is built from: Llama, Mistral, Qwen2/3 (llama.py),
Gemma 1/2/3 (gemma.py), Phi-3 (phi3.py).

They share one architecture (token embedding, blocks of rotary self-attention with grouped-query heads and a
gated MLP, a final norm, an output head) and differ in switches, all in `DecoderConfig`: q/k/v biases, per-head
q/k norms, sliding windows per layer, RoPE scaling and partial rotation, the MLP's activation, norms scaled by
`1 + w` (Gemma), extra norms around attention and MLP (Gemma 2/3), score and logit soft-capping (Gemma 2),
scaled embeddings (Gemma), fused q/k/v and gate/up projections (Phi-3). A family file turns a HF config.json
into a `DecoderConfig`; nothing model-specific lives here.

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
from jaxft.models import kv_cache, layout, stack
from jaxft.models.attention import ATTENTION_BACKENDS, Visibility
from jaxft.models.heads import CausalLMHeads
from jaxft.models.layers import ACTIVATIONS, ROPE_TYPES, Embed, Linear, RMSNorm, Rope, apply_rope
from jaxft.sharding import constrain

# The layout of the residual stream between blocks (names in jaxft/sharding.py RULES).
_ACTIVATION_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and precision of a decoder (module doc); a family's `from_hf` fills it from config.json.

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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: int | None = None
    # Per-layer "full_attention" | "sliding_attention" (Qwen2/3, Gemma 2/3); None = every
    # layer uses `sliding_window` when it is set (Mistral, Phi-3).
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"
    hidden_act: str = "silu"  # the gated MLP's activation (layers.ACTIVATIONS)
    norm_offset: float = 0.0  # RMSNorms scale by offset + weight: 1 for Gemma (layers.RMSNorm)
    # Gemma multiplies token embeddings by sqrt(hidden_size), inside its embedding module (transformers 5), so
    # the prompt-tuning virtual tokens PEFT passes as input embeddings are not scaled.
    embed_scale: bool = False
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too, and one before the MLP
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by this ** -0.5, not head_dim ** -0.5
    attn_logit_softcap: float | None = None  # Gemma 2: scores soft-capped by tanh
    final_logit_softcap: float | None = None  # Gemma 2: logits soft-capped by tanh
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (no scaling)
    partial_rotary_factor: float = 1.0  # the fraction of each head's dimensions RoPE rotates (Phi)
    fused_qkv: bool = False  # Phi-3: one `qkv_proj` for q, k and v
    fused_gate_up: bool = False  # Phi-3: one `gate_up_proj`, gate first
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
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; supported: "
                              f"{', '.join(ACTIVATIONS)}")
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

    def rope(self, window: int | None) -> Rope:
        """The rotary embedding of the layers with this sliding window (Gemma 3's local layers have their own)."""
        dim = int(self.head_dim * self.partial_rotary_factor)
        if window is not None and self.local_rope_theta is not None:
            return Rope(dim, self.local_rope_theta)
        return Rope(dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


# ----------------------------------------------------------------------------- from a HF config.json


def rope_from_hf(hf: Mapping[str, Any], parameters: Mapping[str, Any] | None = None) -> tuple[float, dict | None]:
    """`(theta, scaling)` from a HF config (transformers 4.x or 5.x layout): 5.x nests both in
    `rope_parameters` (or `parameters`, when a family keeps one set per layer type); 4.x keeps `rope_theta` and
    `rope_scaling` at the top level. `scaling` is None for plain RoPE."""
    params = dict(parameters if parameters is not None else hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    params.pop("partial_rotary_factor", None)
    if not params:
        params = dict(hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"rope type {rope_type!r} in {hf.get('model_type')} config is not supported; "
                             f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k != "type"}
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "longrope"):
        scaling.setdefault("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    return float(theta), scaling


def build_config(hf: Mapping[str, Any], fields: dict, overrides: Mapping[str, Any]) -> DecoderConfig:
    """The `DecoderConfig` of `fields` (what a family read from config.json), a sequence classifier when the
    checkpoint is one, with `overrides` (e.g. `dtype=jnp.bfloat16, remat="full"`) replacing fields last."""
    valid = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(f"unknown DecoderConfig override(s) {sorted(unknown)}; valid: {sorted(valid)}")
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        fields["num_labels"] = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    return DecoderConfig(**{**fields, **overrides})


def shape_fields(hf: Mapping[str, Any], default_head_dim: int | None = None) -> dict:
    """The sizes every decoder config.json gives the same way: vocabulary, widths, depth, heads. `head_dim`
    defaults to hidden_size / heads unless the family has a default of its own (Gemma: 256)."""
    num_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or default_head_dim or hf["hidden_size"] // num_heads,
    )


def check_activation(hf: Mapping[str, Any], key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"{key} {act!r} in {hf.get('model_type')} config is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")
    return act


def _dense(cfg: DecoderConfig, n_in, n_out, bias, axes, rngs) -> Linear:
    return Linear(
        n_in, n_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axes=axes, rngs=rngs
    )


def _norm(cfg: DecoderConfig, dim: int, rngs) -> RMSNorm:
    return RMSNorm(dim, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   rngs=rngs)


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        if cfg.fused_qkv:  # Phi-3: q, k and v are slices of one projection's output
            self.qkv_proj = _dense(cfg, cfg.hidden_size, q_dim + 2 * kv_dim, bias, ("embed", "heads"), rngs)
        else:
            self.q_proj = _dense(cfg, cfg.hidden_size, q_dim, bias, ("embed", "heads"), rngs)
            self.k_proj = _dense(cfg, cfg.hidden_size, kv_dim, bias, ("embed", "kv_heads"), rngs)
            self.v_proj = _dense(cfg, cfg.hidden_size, kv_dim, bias, ("embed", "kv_heads"), rngs)
        self.o_proj = _dense(cfg, q_dim, cfg.hidden_size, cfg.o_bias, ("heads", "embed"), rngs)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, cfg.head_dim, rngs)
            self.k_norm = _norm(cfg, cfg.head_dim, rngs)
        else:
            self.q_norm = self.k_norm = None

    def _qkv(self, x):
        if not hasattr(self, "qkv_proj"):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        return qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]

    def __call__(self, x, cos, sin, visibility: Visibility, window_index=None, cache=None, cache_index=None):
        """The attention output for `x` `[B, T, hidden]`. With `cache` (this layer's keys and values
        `[B, K, slots, D]`, jaxft/models/kv_cache.py) the new keys and values are written at slots
        `[cache_index, cache_index + T)` and the queries attend over the cache: returns `(out, cache)`."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 and Gemma 3 normalise each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = visibility.attend(q, k, v, scale=self.scale, window_index=window_index, softcap=self.softcap)
        else:
            cache = kv_cache.write(*cache, k, v, cache_index)
            out = visibility.attend_cache(q, *cache, scale=self.scale, window_index=window_index,
                                          softcap=self.softcap)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out if cache is None else (out, cache)


class DecoderMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU with silu (Llama), GeGLU with gelu (Gemma)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        h, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = cfg.hidden_act
        if cfg.fused_gate_up:  # Phi-3: gate and up are the two halves of one projection's output
            self.gate_up_proj = _dense(cfg, h, 2 * m, bias, ("embed", "mlp"), rngs)
        else:
            self.gate_proj = _dense(cfg, h, m, bias, ("embed", "mlp"), rngs)
            self.up_proj = _dense(cfg, h, m, bias, ("embed", "mlp"), rngs)
        self.down_proj = _dense(cfg, m, h, bias, ("mlp", "embed"), rngs)

    def __call__(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ACTIVATIONS[self.act](gate) * up)


class DecoderLayer(nnx.Module):
    """A pre-norm block. With `sandwich_norms` (Gemma 2/3) the attention and MLP outputs are normed too before
    they join the residual stream: `post_attention_layernorm` norms the attention output there, and
    `pre_feedforward_layernorm` is the MLP's input norm (which `post_attention_layernorm` is elsewhere)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.self_attn = DecoderAttention(cfg, rngs=rngs)
        self.mlp = DecoderMLP(cfg, rngs=rngs)
        self.input_layernorm = _norm(cfg, cfg.hidden_size, rngs)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size, rngs)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = _norm(cfg, cfg.hidden_size, rngs)
            self.post_feedforward_layernorm = _norm(cfg, cfg.hidden_size, rngs)
        self.sandwich = cfg.sandwich_norms

    def __call__(self, x, cos, sin, visibility: Visibility, window_index=None, cache=None, cache_index=None):
        """The block's output; with a `cache`, `(output, cache)` (see `DecoderAttention`)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, visibility, window_index, cache, cache_index)
        if cache is not None:
            attended, cache = attended
        if self.sandwich:
            x = x + self.post_attention_layernorm(attended)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attended
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


class DecoderModel(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        # One stacked group of every layer; methods may split it (stack.regroup).
        make_layer = lambda key: DecoderLayer(cfg, rngs=nnx.Rngs(key))  # noqa: E731
        self.layers = nnx.List([stack.build_group(make_layer, range(cfg.num_layers), rngs.params())])
        self.norm = _norm(cfg, cfg.hidden_size, rngs)


class DecoderForCausalLM(CausalLMHeads, nnx.Module):
    """Decoder-only language model; `__call__` returns float32 logits `[B, T, vocab]`."""

    LAYOUT = layout.DECODER  # where its parts are, by name (jaxft/models/layout.py)

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
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
        x = constrain(self.embed(input_ids), _ACTIVATION_AXES)
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
        rope_of = self._rope_tables(positions, windows)

        def block(layer, x, inputs):
            # Between blocks activations are split over the batch only: each block's weights are
            # gathered (FSDP) or its partial sums reduced (tensor parallelism) inside it.
            window = inputs.get("window")
            return constrain(layer(x, *rope_of(window), visibility, window), _ACTIVATION_AXES)

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
        x = constrain(self.embed(input_ids), _ACTIVATION_AXES)
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
        rope_of = self._rope_tables(positions, windows)

        def block(layer, x, inputs, layer_cache):
            window = inputs.get("window")
            x, layer_cache = layer(x, *rope_of(window), visibility, window, layer_cache, cache.index)
            return constrain(x, _ACTIVATION_AXES), layer_cache

        x, caches = stack.run(self.model.layers, x, block, self._window_per_layer(windows), loop=cfg.layer_loop,
                              caches=list(zip(cache.keys, cache.values)))
        cache = cache.advanced(t, [k for k, _ in caches], [v for _, v in caches])
        return self.model.norm(x[:, t - input_ids.shape[1]:]), cache

    def embed(self, input_ids) -> jax.Array:
        """The token embeddings of `input_ids` `[B, T]` as the HF model's input-embedding module gives them
        (Gemma's are scaled; prompt tuning's text init reads these)."""
        x = self.model.embed_tokens(input_ids)
        if not self.config.embed_scale:
            return x
        # In the compute dtype, as HF multiplies by sqrt(hidden_size) cast to the weights' dtype.
        return x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)

    def _rope_tables(self, positions, windows: tuple):
        """`rope_of(window_index) -> (cos, sin)` for the layers of each window: one table for all when the
        windows share their RoPE, else one per window (Gemma 3's local layers), picked by the traced index."""
        ropes = [self.config.rope(w) for w in windows]
        if all(r == ropes[0] for r in ropes):
            cos, sin = ropes[0].cos_sin(positions)
            return lambda window_index: (cos, sin)
        tables = [r.cos_sin(positions) for r in ropes]
        cos, sin = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
        return lambda window_index: (cos[window_index], sin[window_index])

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

    def token_embedding(self):
        """The token embedding module (what a tied head reads: CausalLMHeads)."""
        return self.model.embed_tokens
