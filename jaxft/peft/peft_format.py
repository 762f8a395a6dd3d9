"""Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`.

The format (PEFT's `save_pretrained` for LoRA): tensors named
`base_model.model.<hf module path>.lora_A.weight` with shape [r, in] and
`...lora_B.weight` with shape [out, r], torch layout, and for DoRA
`...lora_magnitude_vector` with shape [out]; jaxft keeps A as [in, r]
and B as [r, out], so both are transposed. NNX module paths already read as HF
module paths (the model mirrors HF names), so names map one to one; in stacked
decoder blocks each layer's slice is a tensor of its own, under its layer's name.

A sequence classifier's adapter (PEFT task_type SEQ_CLS) also holds the whole trained
head under its HF names (a decoder's `base_model.model.score.weight` [labels, hidden]; BERT's
`classifier.weight` and `.bias`; RoBERTa's `classifier.dense.*` and `classifier.out_proj.*`), which
PEFT's `modules_to_save` (["classifier", "score"], its default for the task) loads.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxft.errors import AdapterError
from jaxft.models import hf, layout
from jaxft.models.hf import stored_in_out
from jaxft.peft.lora import (
    LoRAConfig,
    apply_lora,
    linear_modules,
    lora_candidates,
    lora_layers,
    per_layer_modules,
    select_targets,
)

_PREFIX = "base_model.model."
_CLASSIFIER_HEADS = ["classifier", "score"]  # PEFT's modules_to_save for SEQ_CLS
_REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")  # what load_lora_adapter reads without a default


def lora_target_modules(wrapped: list[str], targets: str):
    """`target_modules` as PEFT stores it: the regex for regex targets, else the sorted module names."""
    if targets.startswith("re:"):
        return targets[3:]
    return sorted({name.split(".")[-1] for name in wrapped})


def lora_adapter_config(config: LoRAConfig, wrapped: list[str], base_model: str | None,
                        classifier: bool = False, fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json of a LoRA adapter. `fan_in_fan_out`: the targets are transformers `Conv1D`s
    (GPT-2), whose weight is `[in, out]`; PEFT sets it for them itself, and records it."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": lora_target_modules(wrapped, config.targets),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "modules_to_save": _CLASSIFIER_HEADS if classifier else None,
        "inference_mode": True,
        "use_dora": config.use_dora,
    }


def lora_tensors(model) -> dict[str, np.ndarray]:
    """The adapter's tensors under PEFT names, float32, torch layout."""
    tensors, arrays = {}, {}

    def layer_slice(variable, j):
        if id(variable) not in arrays:  # a stacked variable is fetched once for all its layers
            arrays[id(variable)] = np.asarray(variable.get_value(), np.float32)
        return arrays[id(variable)] if j is None else arrays[id(variable)][j]

    for name, module, j in lora_layers(model):
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(layer_slice(module.lora_a, j).T)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(layer_slice(module.lora_b, j).T)
        if module.lora_magnitude is not None:  # DoRA: one magnitude per output feature
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = layer_slice(module.lora_magnitude, j)
    if is_classifier(model):  # a classifier's head, trained whole
        head = hf.to_hf_state_dict(model, under=layout.of(model).classifier)
        tensors.update({f"{_PREFIX}{name}": t.astype(np.float32) for name, t in head.items()})
    return tensors


def is_classifier(model) -> bool:
    """Whether `model` is a sequence classifier (its head goes into the adapter, PEFT's modules_to_save)."""
    return bool(getattr(model.config, "num_labels", 0))


def save_lora_adapter(model, directory, config: LoRAConfig, wrapped: list[str], base_model: str | None = None):
    """Write the model's LoRA adapter where `peft.PeftModel.from_pretrained(base, directory)` reads it."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    classifier = is_classifier(model)
    # One flag for the adapter, as in PEFT, which still gives a plain Linear target its own layout.
    conv1d = any(stored_in_out(model, name.rpartition(".")[2]) for name in wrapped)
    with (directory / "adapter_config.json").open("w") as f:
        json.dump(lora_adapter_config(config, wrapped, base_model, classifier, conv1d), f, indent=2)
    return directory


def load_lora_adapter(model, directory) -> tuple[LoRAConfig, list[str]]:
    """Apply the PEFT LoRA/DoRA adapter in `directory` to `model` in place; AdapterError if it does not fit.

    Reads what `PeftModel.save_pretrained` writes (and `save_lora_adapter`): the config's
    rank, alpha, rsLoRA/DoRA switches and target modules, then every tensor, checked
    against the base's module names and shapes before any is set.
    """
    config, tensors = read_lora_adapter(directory)
    return config, apply_lora_tensors(model, config, tensors, directory)


def read_lora_adapter(directory) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """A PEFT LoRA/DoRA adapter directory's config and tensors (PEFT names, torch layout); AdapterError if it is
    not one jaxft can apply."""
    directory = pathlib.Path(directory)
    config_path, tensors_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    missing = [p.name for p in (config_path, tensors_path) if not p.is_file()]
    if missing:
        raise AdapterError(f"{directory} is not a PEFT adapter directory: {' and '.join(missing)} missing (it needs "
                           f"adapter_config.json and adapter_model.safetensors, as PEFT's save_pretrained writes "
                           f"them); give the directory the adapter was saved to.")
    saved = _read_adapter_config(config_path)
    if saved.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {saved.get('peft_type')!r}; only LORA adapters load here: give "
                           f"a LoRA adapter's directory (peft_type LORA).")
    if saved.get("task_type") == "SEQ_CLS":
        raise AdapterError(f"{config_path}: a sequence classification adapter (task_type SEQ_CLS, with its own "
                           f"label head); it loads in transformers' AutoModelForSequenceClassification + peft, "
                           f"not as a language model's adapter.")
    if saved.get("rank_pattern") or saved.get("alpha_pattern"):
        raise AdapterError(f"{config_path}: per-module ranks or alphas (rank_pattern/alpha_pattern) are not "
                           f"supported; jaxft adapters have one rank and alpha.")
    raw = saved["target_modules"]  # PEFT: a list of module names, a regex, or "all-linear"
    targets = ",".join(raw) if isinstance(raw, list) else raw if raw == "all-linear" else f"re:{raw}"
    config = LoRAConfig(rank=int(saved["r"]), alpha=float(saved["lora_alpha"]), targets=targets,
                        use_rslora=bool(saved.get("use_rslora")), use_dora=bool(saved.get("use_dora")))
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors' own SafetensorError for a truncated or foreign file
        raise AdapterError(f"{tensors_path} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                           f"corrupt or incomplete: save or download the adapter again.") from None
    return config, tensors


def apply_lora_tensors(model, config: LoRAConfig, tensors: dict, directory="the adapter") -> list[str]:
    """Wrap `model`'s target layers as `config` says and set their A, B (and DoRA magnitudes) from `tensors`;
    everything is checked against the base before the model changes. Returns the wrapped layer names."""
    _check_fits(model, tensors, directory)
    _check_complete(model, tensors, config, directory)
    wrapped = apply_lora(model, config, rngs=nnx.Rngs(0))
    by_module: dict[int, tuple] = {}
    for name, module, j in lora_layers(model):
        by_module.setdefault(id(module), (module, []))[1].append((name, j))
    for module, layers in by_module.values():
        def gather(suffix, transpose, layers=layers):
            arrays = [tensors[f"{_PREFIX}{name}.{suffix}"] for name, _ in layers]
            arrays = [a.T for a in arrays] if transpose else arrays
            return jnp.asarray(np.stack(arrays) if layers[0][1] is not None else arrays[0])
        module.lora_a.set_value(gather("lora_A.weight", True))
        module.lora_b.set_value(gather("lora_B.weight", True))
        if module.lora_magnitude is not None:
            module.lora_magnitude.set_value(gather("lora_magnitude_vector", False))
    return wrapped


def _read_adapter_config(config_path: pathlib.Path) -> dict:
    """adapter_config.json, with the keys a LoRA config needs; AdapterError if it is not one."""
    try:
        saved = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON ({e}); restore it from the adapter's original files."
                           ) from None
    if not isinstance(saved, dict):
        raise AdapterError(f"{config_path} holds a JSON {type(saved).__name__}, not an object; restore it from the "
                           f"adapter's original files.")
    lacking = [k for k in _REQUIRED_KEYS if k not in saved] if saved.get("peft_type") == "LORA" else []
    if lacking:
        raise AdapterError(f"{config_path} lacks {', '.join(map(repr, lacking))}, which every LoRA adapter config "
                           f"has; restore it from the adapter's original files (PEFT's save_pretrained writes them).")
    return saved


def _check_complete(model, tensors: dict, config: LoRAConfig, directory) -> None:
    """Every layer the adapter's target_modules wrap has its tensors; checked before the model is changed."""
    parts = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if config.use_dora else ())
    wanted = [f"{_PREFIX}{name}.{part}" for name in select_targets(lora_candidates(model), config.targets)
              for part in parts]
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise AdapterError(f"The adapter in {directory} lacks {len(missing)} of the tensors its target_modules "
                           f"call for (e.g. {missing[:3]}): the file is incomplete, or adapter_config.json belongs "
                           f"to another adapter. Save or download the adapter again.")


def _check_fits(model, tensors: dict, directory) -> None:
    """Every adapter tensor names a linear module of this base, with the base's in/out sizes."""
    modules, linears = per_layer_modules(model), linear_modules(model)
    problems = []
    for key, value in tensors.items():
        module, _, kind = key.removeprefix(_PREFIX).partition(".lora_")
        if module not in modules:
            problems.append(f"{key}: the base has no linear module '{module}'")
            continue
        base = linears[modules[module][0]]
        expected = {"A.weight": (None, base.in_features), "B.weight": (base.out_features, None),
                    "magnitude_vector": (base.out_features,)}.get(kind)
        if expected is None or len(expected) != value.ndim or any(
                e is not None and e != s for e, s in zip(expected, value.shape)):
            problems.append(f"{key}: shape {list(value.shape)} does not fit '{module}' "
                            f"({base.in_features} -> {base.out_features})")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise AdapterError(f"The adapter in {directory} does not fit this base model (written for another "
                           f"one?): {'; '.join(problems[:5])}{more}. Load it onto the base model it was trained "
                           f"from (adapter_config.json's base_model_name_or_path says which).")
