"""A model ready to generate: a HF checkpoint, with a PEFT adapter, or what a jaxft run exported."""

from __future__ import annotations

import json
import pathlib
import types

import jax.numpy as jnp

from jaxft.errors import AdapterError, ConfigError
from jaxft.models import hf, stack

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(model_path=None, *, adapter=None, workdir=None, dtype: str = "float32", mesh=None):
    """`(model, tokenizer, run_config)`: the checkpoint at `model_path` with the adapter in `adapter` (a PEFT
    LoRA/DoRA or prompt-tuning directory, or jaxft's bottleneck adapters), or what the run in `workdir` exported
    (its merged or fully fine-tuned model, else its base with its adapter; `run_config` is its resolved config,
    else None). The blocks are laid out for the backend's layer loop."""
    run_config, model_path, adapter = sources(model_path, adapter=adapter, workdir=workdir)
    from jaxft.peft.quant import QuantSpec
    from jaxft.trainer import layer_loop
    on_param = None
    if adapter is not None and run_config is not None and run_config["peft"]["method"] == "qlora":
        # The adapter was trained over the quantised base: quantise it as the run did, layer by layer as it loads.
        on_param = QuantSpec.from_config(types.SimpleNamespace(**run_config["peft"])).on_param
    model = hf.load_pretrained(model_path, mesh=mesh, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype],
                               layer_loop=layer_loop("auto"), on_param=on_param)
    if adapter is not None:
        _apply_adapter(model, pathlib.Path(adapter))
    stack.layout_for_loop(model)
    tokenizer = hf.load_tokenizer(model_path)
    return model, tokenizer, run_config


def sources(model_path=None, *, adapter=None, workdir=None):
    """`(run_config or None, model directory, adapter directory or None)` that `load_model` loads."""
    if workdir is not None and adapter is not None:
        raise ConfigError("give --adapter or --workdir, not both: a run's workdir names its own adapter")
    run_config = None
    if workdir is not None:
        run_config, model_path, adapter = _from_workdir(pathlib.Path(workdir), model_path)
    if model_path is None:
        raise ConfigError("no model: give --model (a Hugging Face model directory) or --workdir (a jaxft run)")
    return run_config, model_path, adapter


def _from_workdir(workdir: pathlib.Path, model_path):
    """The run's config, and the model directory and adapter directory its exports give."""
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{workdir} is not a jaxft run directory (no readable config.json): {e}") from None
    export = workdir / "export"
    if (export / "model" / "config.json").is_file():  # merged or fully fine-tuned: a whole checkpoint
        return config, export / "model", None
    if (export / "adapter" / "adapter_config.json").is_file():
        return config, model_path or config["model"]["path"], export / "adapter"
    raise ConfigError(f"{workdir} has no export (export/model or export/adapter): the run has not finished, or "
                      "its config turned the exports off.")


def _apply_adapter(model, directory: pathlib.Path) -> None:
    from jaxft.peft.adapters import load_adapters
    from jaxft.peft.peft_format import load_lora_adapter
    from jaxft.peft.prompt import load_prompt_adapter
    try:
        saved = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{directory} holds no readable adapter_config.json: {e}") from None
    kind = saved.get("peft_type") or saved.get("adapter_type")
    if kind == "LORA":
        load_lora_adapter(model, directory)
    elif kind == "PROMPT_TUNING":
        load_prompt_adapter(model, directory)
    elif kind == "BOTTLENECK":
        load_adapters(model, directory)
    else:
        raise AdapterError(f"{directory}: adapter type {kind!r} is not one jaxft loads (LORA, PROMPT_TUNING, or "
                           "jaxft's BOTTLENECK)")


def stop_token_ids(tokenizer, model_path) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS and the checkpoint's `generation_config.json`
    `eos_token_id` (an id or a list: chat models often name their end-of-turn token there)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    path = hf.resolve_model_dir(model_path) / "generation_config.json"  # a .gguf: its dequantised copy's
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))


def trained_format(workdir, data_cfg: dict) -> str | None:
    """The data format a run trained on: its `data.format`, or where that was "auto", what it detected
    (`data_report.json`)."""
    fmt = data_cfg.get("format")
    report = pathlib.Path(workdir or "") / "data_report.json"
    if fmt == "auto" and workdir and report.is_file():
        fmt = json.loads(report.read_text()).get("train", {}).get("format", fmt)
    return fmt
