"""Prompt tuning (Lester et al. 2021), as Hugging Face PEFT implements it.

`num_virtual_tokens` trained embeddings `[n, hidden]` are put in front of every
input's token embeddings; the pretrained model stays frozen. As in PEFT, the
virtual tokens are always attendable and take RoPE positions `0..n-1`, and the
real tokens shift by n. The model still returns logits for its T input
positions only, so the loss code is the same as for every other method.

Packed rows (`segment_ids`) are supported beyond PEFT: every segment sees the
virtual tokens, and since packed positions restart per segment, each segment
gets exactly what it would get alone in a row.

Files are PEFT's: `adapter_config.json` with `peft_type` "PROMPT_TUNING" and
`adapter_model.safetensors` holding one tensor, `prompt_embeddings` `[n, hidden]`
(PEFT's `_get_adapter_state_dict` for prompt learning).
"""

import functools
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxft.errors import AdapterError, ConfigError
from jaxft.models.attention import visibility_mask
from jaxft.peft.select import TrainableFilter

INITS = ("random", "text")
TENSOR_NAME = "prompt_embeddings"


class PromptEncoder(nnx.Module):
    """The virtual token embeddings, and how they are prepended to a batch.

    Kept in float32 whatever the model's dtype (they are what trains; PEFT does
    the same) and cast to the compute dtype when prepended.
    """

    def __init__(self, embeddings):
        self.num_virtual_tokens = int(embeddings.shape[0])
        self.embeddings = nnx.Param(jnp.asarray(embeddings, jnp.float32), logical_axes=(None, "embed"))

    def __call__(self, x, attention_mask, positions, segment_ids):
        """Prepend the virtual tokens to `x` `[B, T, D]`.

        Returns `x` `[B, n+T, D]`, positions `[B, n+T]` (virtual `0..n-1`, then the
        given ones plus n), the attention mask `[B, n+T]` (None if none was given),
        and for packed rows `mask_for(window)`, the `[B, 1, n+T, n+T]` attention mask
        for a layer with that sliding window (None for full attention); None for
        unpacked rows, whose virtual tokens causal order alone lets every token see.
        """
        b, n = x.shape[0], self.num_virtual_tokens
        prompts = jnp.broadcast_to(self.embeddings[...].astype(x.dtype), (b, n, x.shape[-1]))
        x = jnp.concatenate([prompts, x], axis=1)
        virtual_positions = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n))
        positions = jnp.concatenate([virtual_positions, positions + n], axis=1)
        if attention_mask is not None:
            attention_mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
        if segment_ids is None:  # PEFT's case: one sequence per row, windows counted in tokens as HF does
            return x, positions, attention_mask, None
        return x, positions, attention_mask, functools.partial(_packed_mask, attention_mask, segment_ids, positions, n)


def _packed_mask(attention_mask, segment_ids, positions, n, window):
    """The attention mask over `n` virtual tokens followed by packed segments (arguments already extended)."""
    b, s = positions.shape
    mask = visibility_mask(b, s, s, kv_mask=attention_mask)  # causal order and padding keys
    # Virtual tokens get segment -1: a segment of their own that every query may also see.
    seg = jnp.concatenate([jnp.full((b, n), -1, segment_ids.dtype), segment_ids], axis=1)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    visible = same | (jnp.arange(s) < n)[None, None, :]
    if window is not None:
        # Packed positions restart per segment, so a window over positions (not row
        # indices) reaches the virtual tokens from a segment as it would from a row start.
        visible = visible & (positions[:, :, None] - positions[:, None, :] < window)
    return mask & visible[:, None]


def trainable_filter() -> TrainableFilter:
    """Only the virtual token embeddings train."""
    return TrainableFilter(((r"prompt_encoder\..*", True), (r".*", False)))


def apply_prompt_tuning(model, num_virtual_tokens: int, *, init: str = "random", init_text: str | None = None,
                        tokenizer=None, rngs: nnx.Rngs) -> PromptEncoder:
    """Give `model` (a `DecoderForCausalLM`) `num_virtual_tokens` trainable virtual tokens, in place.

    init="random": N(0, 1) entries, torch.nn.Embedding's default init, which is
    PEFT's RANDOM. init="text": the word embeddings of `init_text` tokenized by
    `tokenizer` (a HF tokenizer or a model directory), its ids repeated or cut
    to length, as PEFT's TEXT. Returns the new `model.prompt_encoder`.
    """
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens={num_virtual_tokens!r} must be a positive integer.")
    if init not in INITS:
        raise ConfigError(f"prompt init {init!r} is not supported; supported: {', '.join(INITS)}.")
    if not hasattr(model, "prompt_encoder"):
        raise AdapterError(f"{type(model).__name__} has no prompt_encoder slot; prompt tuning needs a "
                           "jaxft.models.decoder.DecoderForCausalLM.")
    if model.prompt_encoder is not None:
        raise AdapterError("the model already has a prompt encoder; apply prompt tuning once.")
    if init == "random":
        embeddings = jax.random.normal(rngs.params(), (num_virtual_tokens, model.config.hidden_size), jnp.float32)
    else:
        ids = text_init_ids(init_text, tokenizer, num_virtual_tokens, model.config.vocab_size)
        embeddings = model.embed(jnp.asarray(ids)[None])[0].astype(jnp.float32)
    model.prompt_encoder = PromptEncoder(embeddings)
    return model.prompt_encoder


def text_init_ids(init_text: str | None, tokenizer, num_virtual_tokens: int, vocab_size: int) -> list[int]:
    """The token ids whose embeddings start the virtual tokens: `init_text`'s, repeated or cut to length."""
    if not init_text:
        raise ConfigError("prompt init 'text' needs init_text, the text whose embeddings start the virtual tokens.")
    if tokenizer is None:
        raise ConfigError("prompt init 'text' needs the model's tokenizer (or its directory) to tokenize init_text.")
    if isinstance(tokenizer, (str, os.PathLike)):
        from jaxft.models.hf import load_tokenizer  # only text init needs transformers' tokenizers

        tokenizer = load_tokenizer(tokenizer)
    # As PEFT: the tokenizer's default call, special tokens (e.g. BOS) included.
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"init_text {init_text!r} tokenizes to no tokens.")
    if max(ids) >= vocab_size:
        raise AdapterError(f"init_text {init_text!r} tokenizes to id {max(ids)}, outside the model's vocabulary "
                           f"of {vocab_size}; is the tokenizer the model's?")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


# ---------------------------------------------------------------------------
# PEFT files


def prompt_adapter_config(model, base_model: str | None = None, init_text: str | None = None,
                          tokenizer_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` PEFT's `PromptTuningConfig` reads for `model`'s prompt encoder.

    With `init_text` the init is recorded as TEXT; PEFT then insists on a
    tokenizer name (only read when it initialises, not when it loads), which
    defaults to `base_model`.
    """
    encoder = _encoder(model)
    cfg = model.config
    tokenizer_name_or_path = tokenizer_name_or_path or (base_model if init_text else None)
    if init_text and not tokenizer_name_or_path:
        raise AdapterError("a text-initialised prompt is recorded with its tokenizer, and PEFT refuses the "
                           "config without one: pass base_model or tokenizer_name_or_path.")
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": cfg.hidden_size,
        "num_transformer_submodules": 1,  # decoder-only: one prompt, not one per encoder and decoder
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "modules_to_save": None,
        "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": tokenizer_name_or_path,
        "tokenizer_kwargs": None,
    }


def save_prompt_adapter(model, directory, *, base_model: str | None = None, init_text: str | None = None,
                        tokenizer_name_or_path: str | None = None) -> pathlib.Path:
    """Write the prompt where `peft.PeftModel.from_pretrained(base, directory)` reads it."""
    config = prompt_adapter_config(model, base_model, init_text, tokenizer_name_or_path)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    embeddings = np.asarray(_encoder(model).embeddings[...], np.float32)
    save_file({TENSOR_NAME: embeddings}, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    with (directory / "adapter_config.json").open("w") as f:
        json.dump(config, f, indent=2)
    return directory


def load_prompt_adapter(model, directory) -> PromptEncoder:
    """Give `model` the prompt of a PEFT prompt-tuning adapter directory, in place."""
    directory = pathlib.Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read a PEFT adapter from {str(directory)!r}: {e}") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise AdapterError(f"{str(directory)!r} holds a {config.get('peft_type')!r} adapter, not PROMPT_TUNING.")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{str(directory)!r} is an encoder-decoder prompt "
                           f"(num_transformer_submodules={config['num_transformer_submodules']}); expected 1.")
    if TENSOR_NAME not in tensors:
        raise AdapterError(f"{str(directory)!r} has no {TENSOR_NAME!r} tensor; it has {sorted(tensors)}.")
    embeddings = tensors[TENSOR_NAME]
    expected = (config["num_virtual_tokens"], model.config.hidden_size)
    if embeddings.shape != expected:
        raise AdapterError(f"{TENSOR_NAME} in {str(directory)!r} has shape {embeddings.shape}; this model needs "
                           f"{expected} (num_virtual_tokens, hidden_size).")
    if model.prompt_encoder is not None:
        raise AdapterError("the model already has a prompt encoder; load a prompt adapter into a plain model.")
    model.prompt_encoder = PromptEncoder(embeddings.astype(np.float32))
    return model.prompt_encoder


def _encoder(model) -> PromptEncoder:
    encoder = getattr(model, "prompt_encoder", None)
    if encoder is None:
        raise AdapterError("the model has no prompt encoder; apply_prompt_tuning first.")
    return encoder
