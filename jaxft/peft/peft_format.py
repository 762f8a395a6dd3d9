"""Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`.

The format (PEFT's `save_pretrained` for LoRA): tensors named
`base_model.model.<hf module path>.lora_A.weight` with shape [r, in] and
`...lora_B.weight` with shape [out, r], torch layout, and for DoRA
`...lora_magnitude_vector` with shape [out]; jaxft keeps A as [in, r]
and B as [r, out], so both are transposed. NNX module paths already read as HF
module paths (the model mirrors HF names), so names map one to one.
"""

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

from jaxft.peft.lora import LoRAConfig, lora_modules

_PREFIX = "base_model.model."


def lora_target_modules(wrapped: list[str], targets: str):
    """`target_modules` as PEFT stores it: the regex for regex targets, else the sorted module names."""
    if targets.startswith("re:"):
        return targets[3:]
    return sorted({name.split(".")[-1] for name in wrapped})


def lora_adapter_config(config: LoRAConfig, wrapped: list[str], base_model: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": lora_target_modules(wrapped, config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "use_dora": config.use_dora,
    }


def lora_tensors(model) -> dict[str, np.ndarray]:
    """The adapter's tensors under PEFT names, float32, torch layout."""
    tensors = {}
    for name, module in lora_modules(model).items():
        a = np.asarray(module.lora_a.get_value(), np.float32)
        b = np.asarray(module.lora_b.get_value(), np.float32)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if module.lora_magnitude is not None:  # DoRA: one magnitude per output feature
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = np.asarray(module.lora_magnitude.get_value(),
                                                                           np.float32)
    return tensors


def save_lora_adapter(model, directory, config: LoRAConfig, wrapped: list[str], base_model: str | None = None):
    """Write the model's LoRA adapter where `peft.PeftModel.from_pretrained(base, directory)` reads it."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    with (directory / "adapter_config.json").open("w") as f:
        json.dump(lora_adapter_config(config, wrapped, base_model), f, indent=2)
    return directory
