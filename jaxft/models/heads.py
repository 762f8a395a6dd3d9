"""The output heads a causal LM family puts on its final hidden states, shared by every such family: the
vocabulary head (untied `lm_head`, or the token embedding when tied) and a sequence classifier's `score` head
over each row's last real token, as transformers' *ForSequenceClassification pools it.

A model class mixes in `CausalLMHeads` and provides `config` (with `num_labels`, and `final_logit_softcap` where
the family soft-caps logits), `lm_head` (None when tied), `score` (None in a language model), `hidden_states`,
and `token_embedding()` (the `Embed` a tied head reads).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models.layers import softcap


class CausalLMHeads:
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
        hidden) -> logits` in the compute dtype (float32 where soft-capped), so a loss can run it over chunks of
        tokens (jaxft/losses.py)."""
        self._check_language_model()
        tied = self.lm_head is None
        graphdef, params = nnx.split(self.token_embedding() if tied else self.lm_head)
        cap = self._final_softcap()
        if tied:
            return (lambda p, h: _capped(nnx.merge(graphdef, p).attend(h), cap)), params
        return (lambda p, h: _capped(nnx.merge(graphdef, p)(h), cap)), params

    def logits(self, hidden):
        """Float32 logits `[B, T, vocab]` of final hidden states `[B, T, hidden]`."""
        self._check_language_model()
        head = self.token_embedding().attend if self.lm_head is None else self.lm_head
        return softcap(head(hidden).astype(jnp.float32), self._final_softcap())

    def _final_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcap", None)

    def _check_language_model(self):
        if self.config.num_labels:
            raise ConfigError(f"this model is a sequence classifier ({self.config.num_labels} labels): it has no "
                              "vocabulary head to give token logits; use classify()")


def _capped(logits, cap):
    """Logits soft-capped in float32 (Gemma 2), or as the head gave them."""
    return logits if cap is None else softcap(logits.astype(jnp.float32), cap)
