"""Model families and the HF <-> NNX bridge.

`FAMILIES` maps a HF `config.json` `model_type` to its `Family`: the family module's
`from_hf(dict, **overrides)` and the model class taking `(config, rngs=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: `from_hf(config_json_dict, **overrides)` gives its config, `model_cls(config, rngs=...)`
    builds the model."""

    name: str
    from_hf: Callable[..., Any]
    model_cls: Any
    # An encoder (BERT, RoBERTa) has no language-model head: it trains as a sequence classifier only.
    encoder: bool = False


from jaxft.models import bert, gemma, gpt2, llama, phi3  # noqa: E402
from jaxft.models.decoder import DecoderConfig, DecoderForCausalLM  # noqa: E402


def _decoders(module, name: str) -> dict[str, Family]:
    family = Family(name, module.from_hf, DecoderForCausalLM)
    return {model_type: family for model_type in module.MODEL_TYPES}


# HF model_type -> family.
FAMILIES: dict[str, Family] = {
    **_decoders(llama, "llama"),  # Llama, Mistral, Qwen2, Qwen3
    **_decoders(gemma, "gemma"),  # Gemma 1, 2, 3 (text)
    **_decoders(phi3, "phi3"),
    "gpt2": Family("gpt2", gpt2.from_hf, gpt2.GPT2LMHeadModel),  # learned positions, Conv1D weights
    **{model_type: Family(model_type, bert.from_hf, cls, encoder=True)  # BERT, RoBERTa: classifiers only
       for model_type, cls in bert.MODEL_CLASSES.items()},
}


def get_family(model_type: str) -> Family:
    """The family implementing HF `model_type`; ModelLoadError names the supported ones."""
    from jaxft.errors import ModelLoadError

    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


from jaxft.models.hf import (  # noqa: E402  (hf.py uses the registry above)
    config_from_hf,
    hf_name_map,
    load_pretrained,
    load_tokenizer,
    read_config,
    to_hf_state_dict,
)
from jaxft.models.layers import Embed, Linear, RMSNorm  # noqa: E402

__all__ = [
    "FAMILIES",
    "Family",
    "get_family",
    "DecoderConfig",
    "DecoderForCausalLM",
    "Linear",
    "Embed",
    "RMSNorm",
    "read_config",
    "config_from_hf",
    "load_pretrained",
    "load_tokenizer",
    "to_hf_state_dict",
    "hf_name_map",
]
