"""BERT and RoBERTa encoders with a sequence classification head, as transformers' `BertForSequenceClassification`
and `RobertaForSequenceClassification` compute them.

An encoder reads the whole row at once (bidirectional attention, padding masked as keys) and classifies it from
its first token ([CLS], RoBERTa's <s>), so it has no language-model head: jaxft trains it as a sequence classifier
only (`peft.task=sequence_classification`), and it never generates text.

The block is post-norm: `LayerNorm(x + dense(attention(x)))`, then `LayerNorm(h + dense(act(dense(h))))`. The
input is the sum of token, position and token-type embeddings, normed. What differs between the two:

- BERT: positions count from 0; the [CLS] hidden state goes through the pooler (`bert.pooler.dense`, tanh), then
  the `classifier` linear layer.
- RoBERTa: positions start at `pad_token_id + 1` and count only tokens that are not padding (padding keeps
  position `pad_token_id`); no pooler: the head is `classifier.dense`, tanh, `classifier.out_proj`.

Attribute names mirror the HF module names, so an NNX path reads as its HF tensor name
(`bert.encoder.layer[0].attention.self.query.kernel` <-> `bert.encoder.layer.0.attention.self.query.weight`;
`self` is HF's name for the attention's q/k/v module). The blocks are stacked and scanned like the decoders'
(jaxft/models/stack.py). Dropout is not applied (training runs as transformers' eval mode does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models import layout, stack
from jaxft.models.attention import ATTENTION_BACKENDS, attention
from jaxft.models.layers import ACTIVATIONS, Embed, LayerNorm, Linear
from jaxft.sharding import constrain

MODEL_TYPES = ("bert", "roberta")

# HF's per-model-type defaults for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": dict(layer_norm_eps=1e-12, pad_token_id=0, type_vocab_size=2, max_position_embeddings=512),
    "roberta": dict(layer_norm_eps=1e-12, pad_token_id=1, type_vocab_size=2, max_position_embeddings=512),
}
_ACTIVATION_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture and precision of a BERT or RoBERTa encoder; `from_hf` fills it from config.json. The
    fields the trainer, FLOP count and PEFT code read (`num_layers`, `head_dim`, `layer_window`, ...) are named
    as `DecoderConfig`'s."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    # The labels of the classification head; 0 only while a config is being inspected (the model refuses it).
    num_labels: int = 0
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"  # stack.REMAT_NAMES
    layer_loop: str = "scan"  # stack.LOOPS
    attention: str = "auto"  # jaxft/models/attention.py BACKENDS

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        for key, valid in (("remat", stack.REMAT_NAMES), ("layer_loop", stack.LOOPS),
                           ("attention", ATTENTION_BACKENDS), ("hidden_act", tuple(ACTIVATIONS))):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key}={getattr(self, key)!r}; choose one of {', '.join(valid)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # plain multi-head attention

    def layer_window(self, i: int) -> None:
        """Every layer attends to the whole row (no sliding window)."""
        return None

    pooled_token = "first"  # the head reads [CLS] / <s> (a decoder's reads each row's last real token)

    @property
    def first_position(self) -> int:
        """The position id of a row's first token: RoBERTa's count after its padding index."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0


def from_hf(hf: Mapping[str, Any], **overrides) -> EncoderConfig:
    """The `EncoderConfig` of a BERT or RoBERTa `config.json` dict; `overrides` replace fields afterwards (e.g.
    `dtype=jnp.bfloat16, num_labels=3`)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"model_type {model_type!r} is not BERT or RoBERTa; supported: {', '.join(MODEL_TYPES)}")
    _check_supported(hf)
    defaults = _DEFAULTS[model_type]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=_given(hf, "max_position_embeddings", defaults),
        type_vocab_size=_given(hf, "type_vocab_size", defaults),
        layer_norm_eps=_given(hf, "layer_norm_eps", defaults),
        hidden_act=hf.get("hidden_act") or "gelu",
        pad_token_id=_given(hf, "pad_token_id", defaults),
        model_type=model_type,
        num_labels=_checkpoint_labels(hf),
    )
    valid = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(f"unknown EncoderConfig override(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return EncoderConfig(**{**fields, **overrides})


def _given(hf: Mapping[str, Any], key: str, defaults: dict):
    """`hf[key]`, or the model type's default where the file leaves it out or sets it to null."""
    value = hf.get(key)
    return defaults[key] if value is None else value


def _check_supported(hf: Mapping[str, Any]) -> None:
    """ModelLoadError for the variants these classes do not compute: relative position embeddings, decoders."""
    kind = hf.get("position_embedding_type") or "absolute"
    if kind != "absolute":
        raise ModelLoadError(f"position_embedding_type {kind!r} is not supported; supported: 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ModelLoadError("a BERT/RoBERTa decoder (is_decoder, cross-attention) is not supported; jaxft runs "
                             "these models as encoders")
    act = hf.get("hidden_act") or "gelu"
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")


def _checkpoint_labels(hf: Mapping[str, Any]) -> int:
    """The label count of a checkpoint saved as a sequence classifier; 0 for any other checkpoint."""
    if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        return 0
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))


def not_a_language_model(model_type: str) -> ConfigError:
    """The error for asking an encoder for what only a language model does (token logits, generation)."""
    return ConfigError(
        f"{model_type} is an encoder (bidirectional attention, no language-model head): jaxft trains it as a "
        f"sequence classifier only, so it neither generates text nor trains as a causal LM. Use "
        f"peft.task=sequence_classification with data.format=classification, or a decoder model (Llama, Qwen, "
        f"Gemma, ...) to generate.")


# ----------------------------------------------------------------------------- modules


def _dense(cfg: EncoderConfig, n_in: int, n_out: int, axes, rngs) -> Linear:
    # Every BERT linear layer has a bias.
    return Linear(n_in, n_out, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axes=axes, rngs=rngs)


def _embed(cfg: EncoderConfig, rows: int, rngs) -> Embed:
    return Embed(rows, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _norm(cfg: EncoderConfig) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = _embed(cfg, cfg.vocab_size, rngs)
        self.position_embeddings = _embed(cfg, cfg.max_position_embeddings, rngs)
        self.token_type_embeddings = _embed(cfg, cfg.type_vocab_size, rngs)
        self.LayerNorm = _norm(cfg)

    def __call__(self, input_ids, positions, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nnx.Module):
    """q, k and v (HF's `attention.self`); the attention itself runs in `BertAttention`."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query = _dense(cfg, h, h, ("embed", "heads"), rngs)
        self.key = _dense(cfg, h, h, ("embed", "heads"), rngs)
        self.value = _dense(cfg, h, h, ("embed", "heads"), rngs)


class BertResidualOutput(nnx.Module):
    """`LayerNorm(residual + dense(x))`: HF's `attention.output` and `output` modules."""

    def __init__(self, cfg: EncoderConfig, n_in: int, in_axis: str, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, n_in, cfg.hidden_size, (in_axis, "embed"), rngs)
        self.LayerNorm = _norm(cfg)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.backend = cfg.num_heads, cfg.head_dim, cfg.attention
        self.self = BertSelfAttention(cfg, rngs=rngs)  # HF's name: `attention.self.query`
        self.output = BertResidualOutput(cfg, cfg.hidden_size, "heads", rngs=rngs)

    def __call__(self, x, padding: dict):
        """Every token attends to every real token of its row; `padding` is how the masked keys are given
        (`kv_mask`, or `kv_lengths` for right padding, which every kernel takes)."""
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = (heads(proj(x)) for proj in (self.self.query, self.self.key, self.self.value))
        out = attention(q, k, v, scale=self.head_dim ** -0.5, backend=self.backend, causal=False, **padding)
        return self.output(out.reshape(b, t, self.num_heads * self.head_dim), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return ACTIVATIONS[self.act](self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertResidualOutput(cfg, cfg.intermediate_size, "mlp", rngs=rngs)

    def __call__(self, x, padding: dict):
        attended = self.attention(x, padding)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        # One stacked group of every layer; methods may split it (stack.regroup).
        make_layer = lambda key: BertLayer(cfg, rngs=nnx.Rngs(key))  # noqa: E731
        self.layer = nnx.List([stack.build_group(make_layer, range(cfg.num_layers), rngs.params())])


class BertPooler(nnx.Module):
    """`tanh(dense(h[CLS]))`: BERT's summary of a row, pretrained on next-sentence prediction."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs)

    def __call__(self, first):
        return jnp.tanh(self.dense(first))


class BertModel(nnx.Module):
    """The encoder body (HF's `bert` / `roberta` module): embeddings, the blocks, BERT's pooler."""

    def __init__(self, cfg: EncoderConfig, *, pooler: bool, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = BertEncoder(cfg, rngs=rngs)
        self.pooler = BertPooler(cfg, rngs=rngs) if pooler else nnx.data(None)


class RobertaClassificationHead(nnx.Module):
    """RoBERTa's head (HF's `classifier`): `out_proj(tanh(dense(h[<s>])))`."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs)
        self.out_proj = _dense(cfg, cfg.hidden_size, cfg.num_labels, ("embed", None), rngs)

    def __call__(self, first):
        return self.out_proj(jnp.tanh(self.dense(first)))


# ----------------------------------------------------------------------------- the classifiers


def _layout(prefix: str, lm_head: str) -> layout.Layout:
    return layout.Layout(
        blocks=f"{prefix}.encoder.layer",
        # The embeddings' LayerNorm norms their sum, so it trains with them.
        embeddings=tuple(f"{prefix}.embeddings.{part}" for part in
                         ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")),
        final_norm=None,  # post-norm: each block ends in its own norm
        lm_head=lm_head,  # the pretraining checkpoint's masked-LM head, which a classifier does not read
        classifier="classifier",
        attention_output="attention.output.dense",
        mlp_output="output.dense",
    )


class BertForSequenceClassification(nnx.Module):
    """A BERT encoder with a classification head; `classify` returns float32 label logits `[B, num_labels]`.

    The model interface the trainer, evaluation and PEFT code use is the decoders' (jaxft/models/decoder.py):
    `config`, `classify`, `hidden_states`, `embed`, `prompt_encoder`; the language-model parts (`logits`,
    `output_head`, `cached_hidden_states`) raise ConfigError naming what to do instead.
    """

    LAYOUT = _layout("bert", lm_head="cls")  # where its parts are, by name (jaxft/models/layout.py)
    PREFIX = "bert"  # the encoder body's attribute (HF's base_model_prefix)
    # Checkpoint tensors transformers skips when loading this class: the position-id buffer old files saved.
    IGNORED_HF_TENSORS = r"(^|\.)embeddings\.position_ids$"
    POOLED = True  # the head reads the pooler's output

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        if not config.num_labels:
            raise not_a_language_model(config.model_type)
        self.config = config
        setattr(self, self.PREFIX, BertModel(config, pooler=self.POOLED, rngs=rngs))
        self.classifier = self._head(config, rngs)
        # Prompt tuning's slot (jaxft/peft/prompt.py); encoders take no prompt, but code that asks finds None.
        self.prompt_encoder = nnx.data(None)

    def _head(self, config: EncoderConfig, rngs):
        return _dense(config, config.hidden_size, config.num_labels, ("embed", None), rngs)

    @property
    def body(self) -> BertModel:
        return getattr(self, self.PREFIX)

    def __call__(self, input_ids, **kwargs):
        """Float32 label logits `[B, num_labels]`; arguments as `classify`."""
        return self.classify(input_ids, **kwargs)

    def classify(self, input_ids, *, attention_mask=None, positions=None, token_type_ids=None,
                 right_padded: bool = False):
        """Float32 label logits `[B, num_labels]` from each row's first token ([CLS], <s>); arguments as
        `hidden_states`."""
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions,
                                    token_type_ids=token_type_ids, right_padded=right_padded)
        first = hidden[:, 0]
        if self.POOLED:
            first = self.body.pooler(first)
        return self.classifier(first).astype(jnp.float32)

    def hidden_states(self, input_ids, *, attention_mask=None, positions=None, token_type_ids=None,
                      right_padded: bool = False):
        """The last block's hidden states `[B, T, hidden]` for `input_ids` `[B, T]`.

        attention_mask: `[B, T]`, 1 = real token, 0 = padding (never attended to); None: every token is real, as
            transformers takes a missing mask.
        positions: `[B, T]` position ids; default BERT's `arange(T)`, RoBERTa's count of the real tokens.
        token_type_ids: `[B, T]` segment of each token (0: first sentence, 1: second); default all 0.
        right_padded: a promise that padding only ends a row (as jaxft's batches do): the mask is then passed as
            row lengths, the form every attention kernel takes.
        """
        cfg = self.config
        if input_ids.shape[1] + cfg.first_position > cfg.max_position_embeddings:
            raise ConfigError(f"rows of {input_ids.shape[1]} tokens are longer than this {cfg.model_type} model's "
                              f"{cfg.max_position_embeddings - cfg.first_position} positions; set train.seq_len "
                              f"(and data.too_long) to fit them.")
        if positions is None:
            positions = self._positions(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = constrain(self.body.embeddings(input_ids, positions, token_type_ids), _ACTIVATION_AXES)
        padding = _padding(attention_mask, right_padded)

        def block(layer, x, inputs):
            return constrain(layer(x, padding), _ACTIVATION_AXES)

        return stack.run(self.body.encoder.layer, x, block, loop=cfg.layer_loop, remat=cfg.remat)

    def _positions(self, input_ids):
        b, t = input_ids.shape
        if self.config.model_type != "roberta":
            return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # RoBERTa (fairseq): real tokens count from pad_token_id + 1, padding stays at pad_token_id.
        real = (input_ids != self.config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + self.config.pad_token_id

    def embed(self, input_ids) -> jax.Array:
        """The token embeddings of `input_ids` `[B, T]` (the word embeddings alone)."""
        return self.body.embeddings.word_embeddings(input_ids)

    # What only a language model has: refused with the reason (generation and causal-LM training reach these).
    def logits(self, hidden):
        raise not_a_language_model(self.config.model_type)

    def output_head(self):
        raise not_a_language_model(self.config.model_type)

    def cached_hidden_states(self, *args, **kwargs):
        raise not_a_language_model(self.config.model_type)


class RobertaForSequenceClassification(BertForSequenceClassification):
    """A RoBERTa encoder with its classification head (no pooler: `classifier.dense`, tanh, `classifier.out_proj`
    over the <s> token)."""

    LAYOUT = _layout("roberta", lm_head="lm_head")
    PREFIX = "roberta"
    # RobertaForSequenceClassification has no pooler; pretraining checkpoints may still carry one.
    IGNORED_HF_TENSORS = r"(^|\.)embeddings\.position_ids$|^roberta\.pooler\."
    POOLED = False

    def _head(self, config: EncoderConfig, rngs):
        return RobertaClassificationHead(config, rngs=rngs)


def _padding(attention_mask, right_padded: bool) -> dict:
    """The attention's padding arguments: none without a mask; row lengths for right padding; else the mask."""
    if attention_mask is None:
        return {}
    if right_padded:
        return {"kv_lengths": jnp.sum(attention_mask != 0, axis=1).astype(jnp.int32)}
    return {"kv_mask": attention_mask}


MODEL_CLASSES = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification}
