"""Hugging Face checkpoints <-> NNX models.

Model attributes mirror HF module names, so the whole name mapping is one
rule on the parameter's leaf name (`_LEAF_TO_HF`): the NNX path
`model.layers.0.self_attn.q_proj.kernel` is the HF tensor
`model.layers.0.self_attn.q_proj.weight`, transposed (NNX kernels are
`[in, out]`, torch `Linear.weight` is `[out, in]`).

Weights are read with `safetensors` into numpy (never pickle / torch.load).
Tied-embedding models: HF omits `lm_head.weight`. When a file has one anyway,
transformers ties if it equals the embedding and unties if it differs; so do
we (with a warning in the second case, which hints at a mis-declared config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors' numpy loader reads BF16
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxft import sharding
from jaxft.errors import ModelLoadError
from jaxft.models import FAMILIES, get_family

log = logging.getLogger(__name__)

# NNX parameter leaf -> (HF tensor leaf, transpose). The one mapping table.
_LEAF_TO_HF: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),  # Linear: [in, out] here, [out, in] in torch
    "bias": ("bias", False),
    "embedding": ("weight", False),  # Embed: [vocab, dim] on both sides
    "scale": ("weight", False),  # RMSNorm
}

# Tensors some checkpoints carry that are not parameters (old Llama files saved
# the RoPE buffer); transformers ignores them on load, so do we.
_IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------
# Config


def read_config(path: str | os.PathLike) -> dict:
    """The `config.json` of a local model directory, checked for a supported `model_type`."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"no config.json in {str(path)!r}; expected a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return config


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides):
    """The family config (e.g. `LlamaConfig`) for a model directory or a config.json dict."""
    if isinstance(path_or_dict, Mapping):
        hf_config = dict(path_or_dict)
    else:
        hf_config = read_config(path_or_dict)
    family = get_family(hf_config.get("model_type"))
    return family.config_cls.from_hf(hf_config, **overrides)


# ---------------------------------------------------------------------------
# Name mapping


def _param_items(model: nnx.Module):
    """(path, Param) pairs of every parameter, in a stable order."""
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def hf_name_map(model: nnx.Module) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (NNX parameter path, transpose?) for every parameter of `model`.

    Works on abstract models (`nnx.eval_shape`) too. A parameter whose leaf
    has no HF counterpart (e.g. an unmerged LoRA factor) raises ValueError.
    """
    mapping = {}
    for path, _ in _param_items(model):
        leaf = path[-1]
        if leaf not in _LEAF_TO_HF:
            raise ValueError(
                f"parameter {'.'.join(map(str, path))} has no Hugging Face name "
                f"(known leaves: {sorted(_LEAF_TO_HF)}); merge adapters into the base model first"
            )
        hf_leaf, transpose = _LEAF_TO_HF[leaf]
        mapping[".".join(map(str, path[:-1] + (hf_leaf,)))] = (path, transpose)
    return mapping


# ---------------------------------------------------------------------------
# Files


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory for `path`: itself, or a Hub snapshot for a repo id."""
    if os.path.isdir(path):
        return Path(path)
    path = str(path)
    if _looks_like_local_path(path):
        raise ModelLoadError(f"model directory {path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=path,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as e:  # no network, unknown repo, gated repo, no huggingface_hub ...
        raise ModelLoadError(
            f"{path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e})"
        ) from None
    return Path(local)


def _weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single or sharded checkpoint)."""
    single = directory / _SINGLE_FILE
    index = directory / _INDEX_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map'")
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise ModelLoadError(f"{index} names shard(s) missing from {directory}: {missing_files}")
        return {name: directory / file for name, file in weight_map.items()}
    found = sorted(p.name for p in directory.iterdir())
    raise ModelLoadError(
        f"no {_SINGLE_FILE} or {_INDEX_FILE} in {directory} (found: {found}); "
        "only safetensors checkpoints are read (convert .bin files with transformers' "
        "save_pretrained(..., safe_serialization=True))"
    )


def _read_tensors(files: Mapping[str, Path], names):
    """Yield (name, numpy array) for `names`, opening each file once.

    A generator, so a caller that converts and drops each array holds one
    tensor's host copy at a time rather than the whole checkpoint's.
    """
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def _tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple]:
    """Shapes from the safetensors headers, without reading data."""
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


# ---------------------------------------------------------------------------
# Load / export


def _untie_if_head_differs(config, files, directory):
    """A tied config whose file also holds a different `lm_head.weight` loads untied.

    That is what transformers does (it ties only when the two are equal), and
    logit parity with transformers is the contract; the warning says why.
    """
    tensors = dict(_read_tensors(files, ["lm_head.weight", "model.embed_tokens.weight"]))
    if np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
        return config
    log.warning(
        "%s: tie_word_embeddings is set but lm_head.weight differs from the embedding; "
        "loading them untied, as transformers does",
        directory,
    )
    return dataclasses.replace(config, tie_word_embeddings=False)


def load_pretrained(path: str | os.PathLike, *, mesh=None,
                    on_param: Callable[[nnx.Module, tuple], None] | None = None, **config_overrides) -> nnx.Module:
    """Load a HF causal LM (config.json + safetensors) into the matching NNX model.

    `path` is a local directory, or a Hub repo id where the Hub is reachable.
    `config_overrides` go to the family config (e.g. `dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16, remat=True`). The model is built abstractly and
    filled from the file one tensor at a time, so random initialisation is never
    paid. With a `mesh` (jaxft/sharding.py) each tensor goes from the file straight
    to its shards on the mesh's devices, so no device ever holds the whole model
    (an 8B model in bfloat16 is 16 GB, a TPU v5e chip's whole memory); without
    one it lands on the default device. `on_param(model, path)` runs after each parameter is filled and may
    replace the module holding it (QLoRA quantises each layer as it arrives:
    `peft.quant.QuantSpec.on_param`). Missing, unexpected or mis-shaped tensors
    raise ModelLoadError naming them.
    """
    directory = resolve_model_dir(path)
    hf_config = read_config(directory)
    family = get_family(hf_config["model_type"])
    config = family.config_cls.from_hf(hf_config, **config_overrides)
    files = _weight_files(directory)
    in_file = {n for n in files if not _IGNORED_HF_TENSORS.search(n)}

    tied = getattr(config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in in_file and "model.embed_tokens.weight" in in_file:
        config = _untie_if_head_differs(config, files, directory)
        if config.tie_word_embeddings:
            in_file.discard("lm_head.weight")

    model = nnx.eval_shape(lambda: family.model_cls(config, rngs=nnx.Rngs(0)))
    flat = dict(_param_items(model))  # the model's own Param objects: filling them fills the model
    names = hf_name_map(model)

    missing = sorted(set(names) - in_file)
    unexpected = sorted(in_file - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected}")
        raise ModelLoadError(
            f"checkpoint in {directory} does not match its {hf_config['model_type']} config: "
            + "; ".join(parts)
        )

    shapes = _tensor_shapes(files)
    bad = []
    for name, (p, transpose) in names.items():
        expected = tuple(flat[p].get_value().shape)
        found = shapes[name][::-1] if transpose else shapes[name]
        if found != expected:
            want = expected[::-1] if transpose else expected
            bad.append(f"{name}: expected {want}, found {shapes[name]}")
    if bad:
        raise ModelLoadError(f"mis-shaped tensors in {directory}: " + "; ".join(bad))

    for name, array in _read_tensors(files, names):
        p, transpose = names[name]
        var = flat.pop(p)  # the model holds it now; a layer `on_param` replaces frees its float weight
        host = (array.T if transpose else array).astype(var.get_value().dtype, copy=False)
        var.set_value(jnp.asarray(host) if mesh is None else _on_mesh(host, var, mesh))
        del var, array, host
        if on_param is not None:
            on_param(model, p)
    return model


def _on_mesh(host: np.ndarray, var: nnx.Variable, mesh):
    """`host` laid out on `mesh` as the variable's logical axes say; each device copies only its shard."""
    spec = sharding.spec_for(var.get_metadata().get("logical_axes"), host.shape, mesh)
    return jax.make_array_from_callback(host.shape, jax.sharding.NamedSharding(mesh, spec), lambda i: host[i])


def load_tokenizer(path: str | os.PathLike):
    """The `transformers` tokenizer saved with a model (local directory or Hub id)."""
    directory = resolve_model_dir(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # no tokenizer files, or files transformers cannot read
        raise ModelLoadError(
            f"cannot load a tokenizer from {str(directory)!r} ({type(e).__name__}: {e}); "
            "the directory needs the tokenizer files save_pretrained writes (tokenizer.json, ...)"
        ) from None


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (torch `[out, in]` layout, param dtype) of `model`.

    The inverse of `load_pretrained`'s mapping; tied models have no
    `lm_head.weight`, as in HF files. Adapters must be merged first.
    """
    params = dict(_param_items(model))
    out = {}
    for name, (p, transpose) in hf_name_map(model).items():
        array = np.asarray(params[p][...])
        out[name] = np.ascontiguousarray(array.T) if transpose else array
    return out
