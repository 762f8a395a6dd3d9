"""Hugging Face checkpoints <-> NNX models.

Model attributes mirror HF module names, so the whole name mapping is one
rule on the parameter's leaf name (`_LEAF_TO_HF`): the NNX path
`model.layers.0.self_attn.q_proj.kernel` is the HF tensor
`model.layers.0.self_attn.q_proj.weight`, transposed (NNX kernels are
`[in, out]`, torch `Linear.weight` is `[out, in]`); transformers' `Conv1D` weights
(GPT-2's projections) are `[in, out]` already and are not (`stored_in_out`).

Weights are read with `safetensors` into numpy (never pickle / torch.load).
Tied-embedding models: HF omits `lm_head.weight`. When a file has one anyway,
transformers ties if it equals the embedding and unties if it differs; so do
we (with a warning in the second case, which hints at a mis-declared config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors' numpy loader reads BF16
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxft import sharding
from jaxft.errors import ModelLoadError
from jaxft.models import FAMILIES, get_family, gguf, layout, stack

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
        raise ModelLoadError(f"no config.json in {str(path)!r}; expected a Hugging Face model directory: point "
                             f"model.path at the directory `save_pretrained` wrote (config.json + *.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not valid JSON ({e}); restore it from the model's original "
                             f"files") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))} (use a checkpoint of one of these architectures)"
        )
    return config


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides):
    """The model config (a `DecoderConfig` for the decoder families) for a model directory or a config.json dict."""
    if isinstance(path_or_dict, Mapping):
        hf_config = dict(path_or_dict)
    else:
        hf_config = read_config(path_or_dict)
    family = get_family(hf_config.get("model_type"))
    return family.from_hf(hf_config, **overrides)


# ---------------------------------------------------------------------------
# Name mapping


def _param_items(model: nnx.Module):
    """(path, Param) pairs of every parameter, in a stable order."""
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where a HF tensor lives in the model: the parameter's NNX path, the layer's position along a stacked
    parameter's leading axis (None for a parameter that is not stacked), and whether torch's layout is the
    transpose of ours."""

    path: tuple
    layer: int | None
    transpose: bool


def stored_in_out(model, module: str) -> bool:
    """Whether HF stores the weight of `model`'s module `module` (its last name, e.g. "c_attn") `[in, out]`, as
    our kernels are, rather than torch `Linear`'s `[out, in]`: transformers' `Conv1D` (GPT-2), which a family
    names in its model class's `CONV1D_MODULES`."""
    return module in getattr(model if isinstance(model, type) else type(model), "CONV1D_MODULES", ())


def hf_name_map(model: nnx.Module, under: str | None = None) -> dict[str, TensorSlot]:
    """HF tensor name -> its `TensorSlot` for every parameter of `model` (every layer of a stacked one), or with
    `under` (a module's dotted path, e.g. "classifier") for the parameters of that module only.

    Works on abstract models (`nnx.eval_shape`) too. A parameter whose leaf
    has no HF counterpart (e.g. an unmerged LoRA factor) raises ValueError.
    """
    mapping = {}
    for path, variable in _param_items(model):
        if under is not None and not is_under(".".join(map(str, path)), under):
            continue
        leaf = path[-1]
        if leaf not in _LEAF_TO_HF:
            raise ValueError(
                f"parameter {'.'.join(map(str, path))} has no Hugging Face name "
                f"(known leaves: {sorted(_LEAF_TO_HF)}); merge adapters into the base model first"
            )
        hf_leaf, transpose = _LEAF_TO_HF[leaf]
        transpose = transpose and not stored_in_out(model, str(path[-2]))
        stacked = stack.layer_ids(variable) is not None
        for j, name in enumerate(stack.layer_names(path, variable)):
            mapping[name.rpartition(".")[0] + "." + hf_leaf] = TensorSlot(path, j if stacked else None, transpose)
    return mapping


# ---------------------------------------------------------------------------
# Files


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory for `path`: itself, the dequantised copy of a GGUF file (jaxft/models/gguf.py), or a
    Hub snapshot for a repo id. Every reader of model.path (weights, tokenizer, export) comes through here."""
    if os.path.isdir(path):
        return Path(path)
    if gguf.is_gguf(path):
        return gguf.dequantised_dir(path)
    path = str(path)
    if os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} is a file, not a directory; set model.path to the directory "
                             f"that holds config.json and the weights, or to a .gguf file")
    if _looks_like_local_path(path):
        raise ModelLoadError(f"model directory {path!r} does not exist; set model.path to a local Hugging Face "
                             f"model directory or a hub id ('org/name')")
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
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as e:  # not JSON, or JSON but not an object
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e}); restore it from the model's "
                                 f"original files") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map'; restore it from the model's original files")
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise ModelLoadError(f"{index} names shard(s) missing from {directory}: {missing_files}; copy or "
                                 f"download the missing shards into that directory")
        return {name: directory / file for name, file in weight_map.items()}
    found = sorted(p.name for p in directory.iterdir())
    raise ModelLoadError(
        f"no {_SINGLE_FILE} or {_INDEX_FILE} in {directory} (found: {found}); "
        "only safetensors checkpoints are read (convert .bin files with transformers' "
        "save_pretrained(..., safe_serialization=True))"
    )


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """`safe_open(file)`, with a file that is not a whole safetensors file (truncated, corrupt, another format
    under that name) as a ModelLoadError naming it."""
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ModelLoadError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                             f"corrupt or incomplete: download or save it again") from None
    with handle as f:
        yield f


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


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(directory) -> str | None:
    """The dtype a checkpoint's floating-point weights are stored in ("bfloat16", ...), from the first file's
    header; None if it holds none of float32, bfloat16, float16."""
    files = _weight_files(Path(directory))
    with _open_safetensors(sorted(set(files.values()))[0]) as f:
        for name in f.keys():
            found = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
            if found:
                return found
    return None


def _tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple]:
    """Shapes from the safetensors headers, without reading data."""
    shapes = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


# ---------------------------------------------------------------------------
# Load / export


def _untie_if_head_differs(config, files, directory, head: str, embedding: str):
    """A tied config whose file also holds a different head tensor (`lm_head.weight`) loads untied.

    That is what transformers does (it ties only when the two are equal), and
    logit parity with transformers is the contract; the warning says why.
    """
    tensors = dict(_read_tensors(files, [head, embedding]))
    if np.array_equal(tensors[head], tensors[embedding]):
        return config
    log.warning(
        "%s: tie_word_embeddings is set but lm_head.weight differs from the embedding; "
        "loading them untied, as transformers does",
        directory,
    )
    return dataclasses.replace(config, tie_word_embeddings=False)


def load_pretrained(path: str | os.PathLike, *, mesh=None,
                    on_param: Callable[[nnx.Module, tuple], None] | None = None, seed: int = 0,
                    **config_overrides) -> nnx.Module:
    """Load a HF causal LM or sequence classifier (config.json + safetensors) into the matching NNX model.

    `path` is a local directory, or a Hub repo id where the Hub is reachable.
    `config_overrides` go to the family config (e.g. `dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16, remat="full"`). The model is built abstractly and
    filled from the file one tensor at a time, so random initialisation is never
    paid. With a `mesh` (jaxft/sharding.py) each tensor goes from the file straight
    to its shards on the mesh's devices, so no device ever holds the whole model
    (an 8B model in bfloat16 is 16 GB, a TPU v5e chip's whole memory); without
    one it lands on the default device. `on_param(model, path)` runs after each parameter is filled and may
    replace the module holding it (QLoRA quantises each layer as it arrives:
    `peft.quant.QuantSpec.on_param`). Missing, unexpected or mis-shaped tensors
    raise ModelLoadError naming them.

    `num_labels=N` (a config override) loads a sequence classifier: a language model's vocabulary head (or a
    pretrained encoder's masked-LM head) is left unread and a new head to N labels (the layout's `classifier`:
    a decoder's `score`, BERT's `classifier`) is drawn from `seed` (weights normal with std
    `initializer_range`, biases zero, as transformers initialises one); a classifier's checkpoint keeps its own
    head, which must have N labels. An encoder (BERT, RoBERTa) loads only as a sequence classifier.
    """
    directory = resolve_model_dir(path)
    hf_config = read_config(directory)
    family = get_family(hf_config["model_type"])
    config = family.from_hf(hf_config, **config_overrides)
    labels = getattr(config, "num_labels", 0)
    check_task(hf_config["model_type"], "sequence_classification" if labels else "causal_lm")
    files = _weight_files(directory)
    ignored = getattr(family.model_cls, "IGNORED_HF_TENSORS", None)  # a family's own (old buffers, unused parts)
    in_file = {n for n in files if not _IGNORED_HF_TENSORS.search(n) and not (ignored and re.search(ignored, n))}
    names = layout.of(family.model_cls)
    _drop_language_model_head(labels, in_file, directory, names)

    head, embedding = f"{names.lm_head}.weight", names.embedding_tensor()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and head in in_file and embedding in in_file:
        config = _untie_if_head_differs(config, files, directory, head, embedding)
        if config.tie_word_embeddings:
            in_file.discard(head)

    model = nnx.eval_shape(lambda: family.model_cls(config, rngs=nnx.Rngs(0)))
    flat = dict(_param_items(model))  # the model's own Param objects: filling them fills the model
    new_head = _new_classifier_head(labels, hf_name_map(model, names.classifier), flat, in_file, files, directory)
    names = _as_saved(hf_name_map(model), in_file, layout.of(model))

    missing = sorted(set(names) - in_file - new_head)
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
            + ". The weights and config.json come from different models, or a file is incomplete: use the "
            "config.json saved with these weights, or download the model again"
        )

    shapes = _tensor_shapes(files)
    bad = []
    for name, slot in [(n, s) for n, s in names.items() if n not in new_head]:
        expected = tuple(flat[slot.path].get_value().shape)[0 if slot.layer is None else 1:]
        found = shapes[name][::-1] if slot.transpose else shapes[name]
        if found != expected:
            want = expected[::-1] if slot.transpose else expected
            bad.append(f"{name}: expected {want}, found {shapes[name]}")
    if bad:
        raise ModelLoadError(f"mis-shaped tensors in {directory}: {'; '.join(bad)}. config.json describes another "
                             f"size of model than these weights: use the config.json saved with them")

    by_param: dict[tuple, dict[int | None, str]] = {}
    for name, slot in names.items():
        by_param.setdefault(slot.path, {})[slot.layer] = name
    std = float(hf_config.get("initializer_range", 0.02))
    draws = np.random.default_rng(seed)  # the new head's weights, in the model's order (the same on every process)
    with _TensorReader(files) as reader:
        for p in [p for p in flat if p in by_param]:  # the model's order
            var = flat.pop(p)  # the model holds it now; a layer `on_param` replaces frees its float weight
            if by_param[p].get(None) in new_head:
                var.set_value(_drawn_param(var, mesh, draws, 0.0 if p[-1] == "bias" else std))
            else:
                var.set_value(_load_param(reader, var, by_param[p], names, mesh))
            del var
            if on_param is not None:
                on_param(model, p)
    return model


def _as_saved(names: dict[str, TensorSlot], in_file: set, model_layout: layout.Layout) -> dict[str, TensorSlot]:
    """`names` as the checkpoint spells them. A checkpoint saved from transformers' base model (`GPT2Model`: the
    original GPT-2 files) lacks the prefix of everything under it (`transformer.`, the first part of the blocks'
    path); transformers adds it on load, and so do we."""
    prefix = model_layout.blocks.split(".")[0] + "."
    unprefixed = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
    if any(n.startswith(prefix) for n in in_file) or not unprefixed & in_file:
        return names
    return {n.removeprefix(prefix): slot for n, slot in names.items()}


def check_task(model_type: str, task: str) -> None:
    """ConfigError when a `model_type` checkpoint cannot train for `task` ("causal_lm" or
    "sequence_classification"): an encoder (BERT, RoBERTa) has no language-model head, so it only classifies."""
    family = get_family(model_type)
    if family.encoder and task != "sequence_classification":
        from jaxft.models.bert import not_a_language_model
        raise not_a_language_model(model_type)


def check_task_of(path, task: str) -> None:
    """`check_task` for the model directory (or hub id) `path`, reading only its config.json: a run calls it
    before reading any data or weights."""
    check_task(read_config(resolve_model_dir(path))["model_type"], task)


def is_under(name: str, module: str) -> bool:
    """Whether the dotted `name` is the module `module` or inside it ("classifier.dense.bias" is under
    "classifier"; "classifier_x" is not)."""
    return name == module or name.startswith(module + ".")


def _drop_language_model_head(labels: int, in_file: set, directory, names: layout.Layout) -> None:
    """A sequence classifier (`labels` > 0) does not read a checkpoint's language-model head (transformers drops it
    too): its tensors leave `in_file`. A classifier's checkpoint loaded as a language model is refused."""
    lm_head = {n for n in in_file if is_under(n.rpartition(".")[0], names.lm_head)}
    if labels:
        in_file -= lm_head
    elif not lm_head and any(is_under(n, names.classifier) for n in in_file):
        raise ModelLoadError(f"{directory} is a sequence classifier (a {names.classifier} head, no vocabulary "
                             f"head), not a language model: train it as one (peft.task=sequence_classification).")


def _new_classifier_head(labels: int, slots: dict, params: dict, in_file: set, files, directory) -> set[str]:
    """The classifier's tensors (`slots`, by HF name) to draw anew: all of them when the checkpoint has none (a
    language model or a pretrained encoder), else none (a classifier's own head, which must have `labels` labels;
    a partial head is reported missing with the rest)."""
    saved = sorted(set(slots) & in_file)
    if labels and not saved:
        return set(slots)
    shapes = _tensor_shapes({name: files[name] for name in saved})
    for name in saved:  # torch layout: a head's output (label) dimension comes first
        found, wanted = shapes[name][0], _hf_shape(params[slots[name].path], slots[name])[0]
        if found != wanted:
            raise ModelLoadError(f"{directory} is a sequence classifier with {found} labels, not {labels}; "
                                 f"train from its base language model for a new label set.")
    return set()


def _hf_shape(variable: nnx.Variable, slot: TensorSlot) -> tuple:
    """The shape of the HF tensor at `slot` of `variable` (one layer's, in torch's layout)."""
    shape = tuple(variable.get_value().shape)[0 if slot.layer is None else 1:]
    return shape[::-1] if slot.transpose else shape


def _drawn_param(var: nnx.Variable, mesh, draws: np.random.Generator, std: float) -> jax.Array:
    """A new parameter drawn from N(0, std) by `draws` (seeded alike on every process), zeros for `std` 0 (a new
    bias, as transformers starts one), laid out like a loaded one."""
    like = var.get_value()
    values = (draws.standard_normal(like.shape) * std if std else np.zeros(like.shape)).astype(like.dtype)
    target = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else jax.sharding.NamedSharding(
        mesh, sharding.spec_for(var.get_metadata().get("logical_axes"), tuple(like.shape), mesh)))
    return jax.make_array_from_callback(tuple(like.shape), target, lambda index: values[index])


class _TensorReader:
    """Reads (blocks of) named tensors from a checkpoint's safetensors files, each file opened once."""

    def __init__(self, files: Mapping[str, Path]):
        self.files = files
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open.close()

    def read(self, name: str, index: tuple) -> np.ndarray:
        """Block `index` (a tuple of slices, one per dimension) of tensor `name`, without reading the rest."""
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file].get_slice(name)[index]


def _load_param(reader: _TensorReader, var: nnx.Variable, layer_names: dict, names: dict, mesh):
    """The parameter's value from the files. Each device reads only its own block of each tensor (its shard
    on `mesh`; the whole array on the default device without one), a stacked parameter one slice per layer,
    so no host ever holds more than one device's part of a stacked parameter at a time."""
    like = var.get_value()
    shape, dtype = tuple(like.shape), like.dtype
    if mesh is None:
        target = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        spec = sharding.spec_for(var.get_metadata().get("logical_axes"), shape, mesh)
        target = jax.sharding.NamedSharding(mesh, spec)

    def block(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if None in layer_names:  # not stacked: one tensor
            return _read_block(reader, layer_names[None], index, names).astype(dtype, copy=False)
        layers = range(*index[0].indices(shape[0]))
        return np.stack([_read_block(reader, layer_names[j], index[1:], names).astype(dtype, copy=False)
                         for j in layers])

    return jax.make_array_from_callback(shape, target, block)


def _read_block(reader: _TensorReader, name: str, index: tuple, names: dict) -> np.ndarray:
    """Block `index` (in our layout) of HF tensor `name`; a tensor stored transposed in torch is read transposed."""
    if not names[name].transpose:
        return reader.read(name, index)
    return np.ascontiguousarray(reader.read(name, index[::-1]).T)


def load_tokenizer(path: str | os.PathLike):
    """The `transformers` tokenizer saved with a model (local directory, Hub id, or a .gguf file, whose tokenizer
    is saved in the same dequantised copy as its weights)."""
    directory = resolve_model_dir(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # no tokenizer files, or files transformers cannot read
        raise ModelLoadError(
            f"cannot load a tokenizer from {str(directory)!r} ({type(e).__name__}: {e}); "
            "the directory needs the tokenizer files save_pretrained writes (tokenizer.json, ...)"
        ) from None


def to_hf_state_dict(model: nnx.Module, under: str | None = None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (torch `[out, in]` layout, param dtype) of `model`, or with `under` of that module
    only (a classifier's head: `under="score"`).

    The inverse of `load_pretrained`'s mapping; tied models have no
    `lm_head.weight`, as in HF files. Adapters must be merged first (outside `under`).
    """
    params = dict(_param_items(model))
    arrays: dict[tuple, np.ndarray] = {}
    out = {}
    for name, slot in hf_name_map(model, under).items():
        if slot.path not in arrays:  # a stacked parameter is fetched once for all its layers
            arrays[slot.path] = np.asarray(params[slot.path][...])
        array = arrays[slot.path] if slot.layer is None else arrays[slot.path][slot.layer]
        out[name] = np.ascontiguousarray(array.T) if slot.transpose else array
    return out
