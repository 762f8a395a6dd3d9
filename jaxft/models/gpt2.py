"""GPT-2 (transformers' `GPT2LMHeadModel`, and `GPT2ForSequenceClassification` with a `score` head).

What makes GPT-2 GPT-2, against the rotary decoder (decoder.py): learned absolute positions (`wpe`, added to the
token embeddings, no RoPE), LayerNorms with biases, an MLP of one activation (`gelu_new`) between `c_fc` and
`c_proj`, biases on every projection, q, k and v from one fused projection `c_attn`, a head tied to the token
embedding, and every projection a transformers `Conv1D`, whose weight is stored `[in, out]`: as our kernels are,
so those tensors load and export untransposed (`CONV1D_MODULES`, read by jaxft/models/hf.py).

HF tensor names are the module paths here (`transformer.h.3.attn.c_attn.weight`); the blocks are stacked and
scanned as the decoder's are (stack.py). The attention-scaling switches of some GPT-2 descendants are honoured:
`scale_attn_weights=False` (no 1/sqrt(head_dim)), `scale_attn_by_inverse_layer_idx` (block i's scores also
divided by i + 1); `reorder_and_upcast_attn` asks torch for float32 scores and softmax, which attention.py
always computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models import kv_cache, stack
from jaxft.models.attention import ATTENTION_BACKENDS, Visibility
from jaxft.models.decoder import check_activation
from jaxft.models.heads import CausalLMHeads
from jaxft.models.layers import ACTIVATIONS, Embed, LayerNorm, Linear
from jaxft.models.layout import Layout
from jaxft.sharding import constrain

MODEL_TYPES = ("gpt2",)

# The layout of the residual stream between blocks (names in jaxft/sharding.py RULES).
_ACTIVATION_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture and precision of a GPT-2 model; `from_hf` fills it from config.json. Offers what every
    family's config offers (`num_kv_heads`, `head_dim`, `layer_window`, the runtime switches)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True  # scores scaled by head_dim ** -0.5 (False: not scaled)
    scale_attn_by_inverse_layer_idx: bool = False  # block i's scores also divided by i + 1
    model_type: str = "gpt2"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"  # what the backward pass recomputes per block (stack.REMAT_NAMES)
    layer_loop: str = "scan"  # stack.LOOPS
    attention: str = "auto"  # attention.ATTENTION_BACKENDS
    num_labels: int = 0  # > 0: a sequence classifier (a `score` head, no vocabulary head), as in decoder.py

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        choices = (("remat", self.remat, stack.REMAT_NAMES), ("layer_loop", self.layer_loop, stack.LOOPS),
                   ("attention", self.attention, ATTENTION_BACKENDS),
                   ("hidden_act", self.hidden_act, tuple(ACTIVATIONS)))
        for name, value, valid in choices:
            if value not in valid:
                raise ConfigError(f"{name}={value!r}; choose one of {', '.join(valid)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # plain multi-head attention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_window(self, i: int) -> None:
        """GPT-2 has no sliding window: every block attends to the whole prefix."""
        return None

    @property
    def attention_scale(self) -> float:
        return self.head_dim ** -0.5 if self.scale_attn_weights else 1.0


def from_hf(hf: Mapping[str, Any], **overrides) -> GPT2Config:
    """The `GPT2Config` of a GPT-2 `config.json` dict; `overrides` replace fields afterwards (e.g.
    `dtype=jnp.bfloat16, remat="full"`)."""
    hf = dict(hf)
    if hf.get("model_type") not in MODEL_TYPES:
        raise ModelLoadError(f"model_type {hf.get('model_type')!r} is not GPT-2; supported: {', '.join(MODEL_TYPES)}")
    if hf.get("add_cross_attention"):
        raise ModelLoadError("this GPT-2 config adds cross-attention (the decoder of an encoder-decoder model); "
                             "only the causal language model is supported")
    missing = [key for key in ("vocab_size", "n_embd", "n_layer", "n_head") if key not in hf]
    if missing:
        raise ModelLoadError(f"this GPT-2 config.json lacks {', '.join(missing)}, which every GPT-2 config has; use "
                             f"the config.json saved with the weights")
    hidden = hf["n_embd"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        max_position_embeddings=hf.get("n_positions", 1024),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=check_activation(hf, "activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    )
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        fields["num_labels"] = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    valid = {f.name for f in dataclasses.fields(GPT2Config)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(f"unknown GPT2Config override(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return GPT2Config(**{**fields, **overrides})


def _dense(cfg: GPT2Config, n_in: int, n_out: int, axes, rngs, bias: bool = True) -> Linear:
    return Linear(n_in, n_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axes=axes, rngs=rngs)


def _norm(cfg: GPT2Config) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        h = cfg.hidden_size
        self.c_attn = _dense(cfg, h, 3 * h, ("embed", "heads"), rngs)  # q, k, v: thirds of its output, in order
        self.c_proj = _dense(cfg, h, h, ("heads", "embed"), rngs)

    def __call__(self, x, visibility: Visibility, query_scale=None, cache=None, cache_index=None):
        """The attention output for `x` `[B, T, hidden]`; with a `cache`, `(out, cache)` as in
        decoder.DecoderAttention. `query_scale`: this block's extra score factor (1 / (i + 1)), or None."""
        b, t, _ = x.shape
        q, k, v = (a.reshape(b, t, self.num_heads, self.head_dim) for a in jnp.split(self.c_attn(x), 3, axis=-1))
        if query_scale is not None:
            # On q, not in `scale`: the fused kernels (cuDNN's) take their scale as a number, not a traced one.
            q = q * query_scale.astype(q.dtype)
        if cache is None:
            out = visibility.attend(q, k, v, scale=self.scale)
        else:
            cache = kv_cache.write(*cache, k, v, cache_index)
            out = visibility.attend_cache(q, *cache, scale=self.scale)
        out = self.c_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out if cache is None else (out, cache)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.c_fc = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.c_proj = _dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class GPT2Block(nnx.Module):
    """A pre-norm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = _norm(cfg)
        self.attn = GPT2Attention(cfg, rngs=rngs)
        self.ln_2 = _norm(cfg)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x, visibility: Visibility, query_scale=None, cache=None, cache_index=None):
        attended = self.attn(self.ln_1(x), visibility, query_scale, cache, cache_index)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x if cache is None else (x, cache)


class GPT2Model(nnx.Module):
    """transformers' `transformer`: token and position embeddings, the stacked blocks `h`, the final norm."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        embed = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, **embed)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, **embed)
        make_block = lambda key: GPT2Block(cfg, rngs=nnx.Rngs(key))  # noqa: E731
        self.h = nnx.List([stack.build_group(make_block, range(cfg.num_layers), rngs.params())])
        self.ln_f = _norm(cfg)


class GPT2LMHeadModel(CausalLMHeads, nnx.Module):
    """GPT-2 language model (or sequence classifier); the model interface of decoder.DecoderForCausalLM:
    `__call__` returns float32 logits `[B, T, vocab]`."""

    LAYOUT = Layout(blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
                    final_norm="transformer.ln_f", attention_output="attn.c_proj", mlp_output="mlp.c_proj")
    # Modules transformers builds as `Conv1D`: their HF weight is `[in, out]`, our kernel's layout (hf.py), and
    # PEFT adapts them with `fan_in_fan_out` (peft_format.py). The heads are ordinary `nn.Linear`s.
    CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")
    # The causal mask buffers older checkpoints (the original GPT-2 files) saved; transformers ignores them too.
    IGNORED_HF_TENSORS = r"(^|\.)attn\.(bias|masked_bias)$"

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)
        if config.tie_word_embeddings or config.num_labels:
            self.lm_head = None  # logits come from transformer.wte.attend (a classifier has none)
        else:
            self.lm_head = _dense(config, config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs, bias=False)
        self.score = (_dense(config, config.hidden_size, config.num_labels, ("embed", None), rngs, bias=False)
                      if config.num_labels else nnx.data(None))
        self.prompt_encoder = nnx.data(None)  # prompt tuning's virtual tokens (jaxft/peft/prompt.py)

    def __call__(self, input_ids, **kwargs):
        """Float32 logits `[B, T, vocab]` for `input_ids` `[B, T]`; arguments as `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, **kwargs))

    def hidden_states(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                      right_padded: bool = False):
        """The final normed hidden states `[B, T, hidden]` for `input_ids` `[B, T]`; arguments as
        `DecoderForCausalLM.hidden_states` (`positions` index the learned position embeddings).

        With `prompt_encoder` set, its virtual tokens precede every row and take positions `0..n-1`, the real
        tokens moving up by n: PEFT feeds them to transformers as input embeddings, to which GPT-2 adds the
        position embeddings of the whole extended row."""
        cfg = self.config
        b, t = input_ids.shape
        counted = positions is None  # positions 0..T-1 (and the virtual tokens'): the row's length is their end
        if counted:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(input_ids)
        kv_mask, dense_masks = (None if right_padded else attention_mask), None
        if self.prompt_encoder is not None:
            x, positions, kv_mask, dense_mask_for = self.prompt_encoder(x, kv_mask, positions, segment_ids)
            if dense_mask_for is not None:  # packed rows: one mask says what each token sees
                dense_masks, segment_ids = (dense_mask_for(None),), None
        if counted:
            self._check_length(x.shape[1])
        x = constrain(x + self.transformer.wpe(positions), _ACTIVATION_AXES)
        visibility = Visibility((None,), cfg.attention, segment_ids=segment_ids, kv_mask=kv_mask,
                                dense_masks=dense_masks)

        def block(layer, x, inputs):
            return constrain(layer(x, visibility, inputs.get("query_scale")), _ACTIVATION_AXES)

        x = stack.run(self.transformer.h, x, block, self._per_layer(), loop=cfg.layer_loop, remat=cfg.remat)
        return self.transformer.ln_f(x[:, -t:])  # the T input positions only

    def cached_hidden_states(self, input_ids, cache: kv_cache.KVCache, *, attention_mask, positions,
                             prompt: bool = False):
        """A pass of generation over a KV cache; arguments and result as
        `DecoderForCausalLM.cached_hidden_states`."""
        x = self.embed(input_ids)
        if self.prompt_encoder is not None:
            if prompt:
                x, positions, attention_mask, _ = self.prompt_encoder(x, attention_mask, positions, None)
            else:
                positions = positions + self.prompt_encoder.num_virtual_tokens
        x = constrain(x + self.transformer.wpe(positions), _ACTIVATION_AXES)
        t = x.shape[1]
        cache = cache.admit(attention_mask)
        visibility = Visibility((None,), dense_masks=cache.visibility_masks(t, (None,)))

        def block(layer, x, inputs, layer_cache):
            x, layer_cache = layer(x, visibility, inputs.get("query_scale"), layer_cache, cache.index)
            return constrain(x, _ACTIVATION_AXES), layer_cache

        x, caches = stack.run(self.transformer.h, x, block, self._per_layer(), loop=self.config.layer_loop,
                              caches=list(zip(cache.keys, cache.values)))
        cache = cache.advanced(t, [k for k, _ in caches], [v for _, v in caches])
        return self.transformer.ln_f(x[:, t - input_ids.shape[1]:]), cache

    def embed(self, input_ids) -> jax.Array:
        """The token embeddings of `input_ids` `[B, T]`, without positions: what transformers' input-embedding
        module gives (prompt tuning's text init reads these)."""
        return self.transformer.wte(input_ids)

    def _check_length(self, length: int) -> None:
        """ConfigError for rows longer than the learned positions: their tail would have no position embedding
        (the lookup would give NaN, where transformers raises)."""
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ConfigError(f"rows of {length} positions, but this GPT-2 learned {limit} (n_positions); use rows "
                              f"of at most {limit} tokens, prompt tuning's virtual tokens included (train.seq_len)")

    def _per_layer(self) -> dict:
        """Per-block data for the layer loop: each block's extra score factor where the config asks for one."""
        if not self.config.scale_attn_by_inverse_layer_idx:
            return {}
        return {"query_scale": 1.0 / np.arange(1, self.config.num_layers + 1, dtype=np.float32)}

    def token_embedding(self):
        """The token embedding module (what a tied head reads: CausalLMHeads)."""
        return self.transformer.wte
