"""Model families and the HF <-> NNX bridge.

`FAMILIES` maps a HF `config.json` `model_type` to the module that implements
it; every family module exposes `<Name>Config.from_hf(dict, **overrides)` and a
causal-LM class taking `(config, rngs=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: Any
    model_cls: Any


from jaxft.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

_llama = Family("llama", LlamaConfig, LlamaForCausalLM)

# HF model_type -> family. Llama, Mistral, Qwen2 and Qwen3 share one implementation.
FAMILIES: dict[str, Family] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
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
    "LlamaConfig",
    "LlamaForCausalLM",
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
