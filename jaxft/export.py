"""What a finished run leaves for other tools, under `<workdir>/export/`.

`adapter/`: a LoRA/DoRA adapter or a tuned prompt in PEFT format (peft, vLLM and
transformers load LoRA; peft loads both).
`model/`: a full Hugging Face checkpoint: the fully fine-tuned model, or a LoRA
run's adapter merged into its base when `export.merged` is set.
`adapter/vllm.json`: whether vLLM can serve the adapter, why not, and the command that would.
"""

import json
import logging
import pathlib
import re

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxft.data.pipeline import pad_token_id
from jaxft.models import hf
from jaxft.peft.adapters import save_adapters
from jaxft.peft.lora import merge_lora
from jaxft.peft.peft_format import save_lora_adapter
from jaxft.peft.prompt import save_prompt_adapter
from jaxft.peft.quant import dequantize_model
from jaxft.peft.serving import write_vllm_verdict

log = logging.getLogger("jaxft")


def export_run(model, method, tokenizer, config, directory, label_names=None) -> None:
    """Write the exports `config.export` asks for; logs each path. `label_names`: a sequence classifier's labels
    in id order (its HF config's id2label; a LoRA adapter's labels.json)."""
    directory = pathlib.Path(directory)
    if method.name in ("lora", "qlora"):
        if config.export.adapter:
            path = save_lora_adapter(model, directory / "adapter", method.lora, list(method.wrapped),
                                     base_model=config.model.path)
            if label_names is not None:  # PEFT keeps no label names: the base is built with them (README)
                (path / "labels.json").write_text(json.dumps(dict(id2label=dict(enumerate(label_names))),
                                                             indent=2) + "\n")
            log.info("Exported the LoRA adapter (PEFT format) to %s; %s", path, _vllm_summary(path, config, model))
        if config.export.merged:
            merged = dequantize_model(merge_lora(nnx.clone(model)))  # QLoRA: float weights for HF
            path = save_hf_model(merged, directory / "model", config.model.path, tokenizer, label_names,
                                 config.export.merged_dtype)
            log.info("Exported the merged model (HF format, %s) to %s", _file_dtype(path), path)
    elif method.name == "adapter":
        if config.export.adapter:
            path = save_adapters(model, directory / "adapter", kind=config.peft.adapter_kind,
                                 bottleneck=config.peft.adapter_size, activation=config.peft.adapter_activation,
                                 base_model=config.model.path)
            log.info("Exported the bottleneck adapters (jaxft format; PEFT has none) to %s; %s", path,
                     _vllm_summary(path, config, model))
    elif method.name == "prompt_tuning":
        if config.export.adapter:
            path = save_prompt_adapter(model, directory / "adapter", base_model=config.model.path,
                                       init_text=config.peft.prompt_init_text if config.peft.prompt_init == "text"
                                       else None)
            log.info("Exported the prompt (PEFT prompt-tuning format) to %s; %s", path,
                     _vllm_summary(path, config, model))
    elif method.name in ("full", "partial", "bitfit"):  # base weights trained: the whole model
        path = save_hf_model(model, directory / "model", config.model.path, tokenizer, label_names,
                             config.export.merged_dtype)
        log.info("Exported the fine-tuned model (HF format, %s) to %s", _file_dtype(path), path)


def _file_dtype(directory) -> str:
    return hf.stored_dtype(directory) or "?"


def _vllm_summary(adapter_dir, config, model) -> str:
    """Write vllm.json beside the adapter (jaxft/peft/serving.py) and say in a line what it found."""
    verdict = write_vllm_verdict(adapter_dir, config.model.path, model.config.model_type)
    if verdict["servable"]:
        return "vLLM can serve it: " + verdict["command"]
    return "vLLM cannot serve it: " + "; ".join(verdict["why_not"])


def save_hf_model(model, directory, base_path, tokenizer, label_names=None, dtype: str = "auto") -> pathlib.Path:
    """config.json (the base's), model.safetensors and the tokenizer: loadable by `from_pretrained`. With
    `label_names` a sequence classifier's (AutoModelForSequenceClassification). `dtype`: the weights' dtype
    in the file, "auto" for the base checkpoint's (a bfloat16 base gives a bfloat16 export, whatever dtype
    the run trained in), or "float32", "bfloat16", "float16"."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_dir = hf.resolve_model_dir(base_path)
    hf_config = hf.read_config(base_dir)
    dtype = export_dtype(dtype, base_dir, hf_config)
    tensors = {name: t.astype(EXPORT_DTYPES[dtype]) for name, t in hf.to_hf_state_dict(model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = dict(hf_config, **{key: dtype for key in ("torch_dtype", "dtype") if key in hf_config})
    if label_names is not None:
        hf_config = classifier_config(hf_config, label_names, pad_token_id(tokenizer))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer.save_pretrained(str(directory))
    return directory


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_dtype(choice: str, base_dir, hf_config: dict) -> str:
    """`export.merged_dtype` resolved: "auto" is the base's dtype, as its config.json names it (`torch_dtype`,
    or `dtype` in newer files) or else as its weights are stored; float32 when neither says."""
    if choice != "auto":
        return choice
    named = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return named if named in EXPORT_DTYPES else hf.stored_dtype(base_dir) or "float32"


# The class-name endings of the checkpoints a classifier is trained from: a language model, a pretrained encoder
# (BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM) or its bare body (BertModel).
_BASE_ARCHITECTURE = re.compile(r"(ForCausalLM|LMHeadModel|ForMaskedLM|ForPreTraining|Model)$")


def classifier_config(hf_config: dict, label_names: list[str], pad_id: int) -> dict:
    """A base model's HF config as its sequence classifier's: the architecture, the labels, and the pad
    token id transformers pools by (a decoder's last token that is not padding)."""
    arch = [_BASE_ARCHITECTURE.sub("ForSequenceClassification", a) for a in hf_config.get("architectures") or []]
    return dict(hf_config, architectures=arch or None, num_labels=len(label_names), pad_token_id=pad_id,
                id2label={str(i): name for i, name in enumerate(label_names)},
                label2id={name: i for i, name in enumerate(label_names)})
