"""Several LoRA adapters for one base: keep them loaded, switch the active one, combine them into one.

    adapters = AdapterSet(model)              # a base model, loaded once
    adapters.add("sql", "runs/sql/export/adapter")
    adapters.add("chat", "runs/chat/export/adapter")
    adapters.activate("sql")                  # model now answers with the sql adapter; no weights reread
    weighted_adapter(["runs/sql/export/adapter", "runs/chat/export/adapter"], [0.7, 0.3], "merged/")

`weighted_adapter` writes what PEFT's `add_weighted_adapter` builds, as an adapter directory of its own:
with `combination="linear"` (adapters of one rank) each layer's A is the sum of sign(w s) sqrt(|w s|) A_i
and B the sum of sqrt(|w s|) B_i, where s = alpha/r (alpha/sqrt(r) with rsLoRA) is each adapter's scale;
with `"cat"` the A_i scaled by w s are stacked along the rank and the B_i beside them, so the rank is the
sum of the ranks and each update is exactly w s B_i A_i. The result has r = lora_alpha = its rank, the
union of the targets, and the other settings of the first adapter, as PEFT's has, so peft loads it to
the same logits as its own combination.
"""

import json
import math
import pathlib

import numpy as np
from safetensors.numpy import save_file

from jaxft.errors import AdapterError
from jaxft.peft.lora import remove_lora
from jaxft.peft.peft_format import apply_lora_tensors, read_lora_adapter

COMBINATIONS = ("linear", "cat")


class AdapterSet:
    """LoRA adapters read once and kept in host memory, any one of them applied to the model on request."""

    def __init__(self, model):
        self.model = model
        self.adapters: dict[str, tuple] = {}
        self.active: str | None = None

    def add(self, name: str, directory) -> None:
        """Read the adapter in `directory` under `name` (AdapterError if it is not a LoRA adapter)."""
        self.adapters[name] = (*read_lora_adapter(directory), str(directory))

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter the model runs with (None: the bare base); AdapterError for an unknown name or
        an adapter that does not fit the base (the model is left as it was)."""
        if name is not None and name not in self.adapters:
            raise AdapterError(f"No adapter named {name!r}; added: {sorted(self.adapters)}. Add it first with "
                               f"AdapterSet.add(name, directory).")
        remove_lora(self.model)
        self.active = None
        if name is not None:
            config, tensors, directory = self.adapters[name]
            apply_lora_tensors(self.model, config, tensors, directory)
            self.active = name


def weighted_adapter(directories, weights, out_dir, combination: str = "linear") -> pathlib.Path:
    """Combine the PEFT LoRA adapters in `directories` with `weights` as PEFT's `add_weighted_adapter` does
    (module doc) and write the result to `out_dir`."""
    if combination not in COMBINATIONS:
        raise AdapterError(f"combination={combination!r} is not one of {COMBINATIONS}.")
    if len(directories) != len(weights) or not directories:
        raise AdapterError(f"Give one weight per adapter: {len(directories)} adapters, {len(weights)} weights.")
    loaded = [_read(d) for d in directories]
    ranks = [saved["r"] for saved, _ in loaded]
    if combination == "linear" and len(set(ranks)) > 1:
        raise AdapterError(f"combination='linear' adds the adapters' A and B matrices, so their ranks must agree "
                           f"(got {ranks}); use combination='cat'.")
    rank = ranks[0] if combination == "linear" else sum(ranks)
    modules = sorted({key.rsplit(".lora_", 1)[0] for _, tensors in loaded for key in tensors})
    out = {}
    for module in modules:
        parts = [(tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight"), saved, w)
                 for (saved, tensors), w in zip(loaded, weights)]
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = _combine(parts, combination, rank)
    config = dict(loaded[0][0], r=rank, lora_alpha=rank, target_modules=_union_targets([s for s, _ in loaded]),
                  alpha_pattern={}, rank_pattern={})
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _read(directory) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of a plain LoRA adapter, checked for what combining needs."""
    config, tensors = read_lora_adapter(directory)  # the checks loading makes
    saved = json.loads((pathlib.Path(directory) / "adapter_config.json").read_text())
    if config.use_dora:
        raise AdapterError(f"{directory} is a DoRA adapter: its magnitudes do not combine linearly (PEFT refuses "
                           f"them too); combine plain LoRA adapters.")
    return saved, {k: v.astype(np.float32) for k, v in tensors.items()}


def _scale(saved: dict) -> float:
    r, alpha = saved["r"], saved["lora_alpha"]
    return alpha / math.sqrt(r) if saved.get("use_rslora") else alpha / r


def _combine(parts, combination: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """One module's new A [rank, in] and B [out, rank] from (A_i, B_i, config_i, weight_i), A_i None where
    adapter i does not adapt the module."""
    present = [(a, b, saved, w) for a, b, saved, w in parts if a is not None]
    n_in, n_out = present[0][0].shape[1], present[0][1].shape[0]
    if combination == "cat":
        a_new, b_new = np.zeros((rank, n_in), np.float32), np.zeros((n_out, rank), np.float32)
        stacked_a = np.concatenate([a * w * _scale(saved) for a, _, saved, w in present])
        stacked_b = np.concatenate([b for _, b, _, _ in present], axis=1)
        a_new[: len(stacked_a)], b_new[:, : stacked_b.shape[1]] = stacked_a, stacked_b
        return a_new, b_new
    a_new, b_new = np.zeros((rank, n_in), np.float32), np.zeros((n_out, rank), np.float32)
    for a, b, saved, w in present:
        scaled = w * _scale(saved)
        a_new += math.copysign(math.sqrt(abs(scaled)), scaled) * a
        b_new += math.sqrt(abs(scaled)) * b
    return a_new, b_new


def _union_targets(configs) -> list | str:
    targets = [c["target_modules"] for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise AdapterError("The adapters name their target modules differently (a regex and a list); PEFT cannot "
                           "combine those either. Save them with target_modules of one kind.")
    return sorted(set().union(*targets))
