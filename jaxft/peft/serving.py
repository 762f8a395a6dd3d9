"""Can vLLM serve an exported adapter? Each export says so in `vllm.json` beside it, and why not when it cannot.

What vLLM reads of a PEFT adapter (its `PEFTHelper`): `r`, `lora_alpha` and `target_modules` are required;
`modules_to_save` must be empty (so a classifier's trained head cannot go with it); DoRA (`use_dora`) is not
supported; rsLoRA is. An adapter's rank must not exceed the server's `--max-lora-rank`, which is 16 unless
raised, to one of a fixed set of values (vLLM refuses the adapter at load: "LoRA rank 64 is greater than
max_lora_rank 16"). vLLM serves
LoRA only: prompt tuning and bottleneck adapters have no vLLM form. LoRA goes on the decoder's linear
projections; an adapter on the output head or embeddings needs vLLM's extra options, if the model supports
them at all.
"""

import json
import pathlib

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
# The projections vLLM's decoders take LoRA on: Llama-style and Phi-3's fused ones.
_DECODER_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                        "gate_up_proj"}
# Base models (HF model_type) whose vLLM implementation takes no LoRA at all (its supported-models table has no
# LoRA mark for them): GPT-2, and the encoders, which vLLM runs as pooling models.
_NO_LORA_IN_VLLM = {"gpt2": "GPT-2 (GPT2LMHeadModel)", "bert": "BERT", "roberta": "RoBERTa"}


def vllm_verdict(adapter_config: dict, model_type: str | None = None) -> dict:
    """`{"servable", "why_not", "max_lora_rank", "notes"}` for a PEFT adapter_config.json's contents, on a base
    of HF `model_type` (None: not known)."""
    why_not, notes = [], []
    if model_type in _NO_LORA_IN_VLLM:
        why_not.append(f"vLLM's {_NO_LORA_IN_VLLM[model_type]} takes no LoRA adapters; serve the merged model "
                       f"(export.merged=True)")
    if adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") or adapter_config.get("adapter_type")
        why_not.append(f"vLLM serves LoRA adapters only; this is {kind!r}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if adapter_config.get(k) in (None, "", [])]
    if missing:
        why_not.append(f"adapter_config.json lacks {missing}, which vLLM requires")
    if adapter_config.get("use_dora"):
        why_not.append("DoRA (use_dora) is not supported by vLLM; merge it (export.merged=True) and serve the "
                       "merged model instead")
    if adapter_config.get("modules_to_save"):
        why_not.append(f"modules_to_save {adapter_config['modules_to_save']} (a trained head) is not supported by "
                       f"vLLM; serve the merged model (export.merged=True)")
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, list):
        others = sorted({t.split(".")[-1] for t in targets} - _DECODER_PROJECTIONS)
        if others:
            notes.append(f"LoRA on {others} (not a decoder projection) needs vLLM options beyond --enable-lora, "
                         f"where the model supports it")
    rank = adapter_config.get("r")
    max_rank = None
    if isinstance(rank, int):
        max_rank = next((m for m in VLLM_MAX_LORA_RANKS if m >= max(rank, VLLM_DEFAULT_MAX_LORA_RANK)), None)
        if max_rank is None:
            why_not.append(f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts")
        elif max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
            notes.append(f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: start "
                         f"the server with --max-lora-rank {max_rank}")
    return dict(servable=not why_not, why_not=why_not, max_lora_rank=max_rank, notes=notes)


def write_vllm_verdict(adapter_dir, base_model: str | None, model_type: str | None = None) -> dict:
    """Judge the adapter in `adapter_dir` (its adapter_config.json) for a base of `model_type`, write the verdict
    to `vllm.json` there with a command that serves it, and return it."""
    adapter_dir = pathlib.Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text()) if config_path.is_file() else {"peft_type": None}
    verdict = vllm_verdict(saved, model_type)
    if verdict["servable"]:
        verdict["command"] = (f"vllm serve {base_model or '<base model>'} --enable-lora --max-lora-rank "
                              f"{verdict['max_lora_rank']} --lora-modules adapter={adapter_dir.absolute()}")
    (adapter_dir / "vllm.json").write_text(json.dumps(verdict, indent=2) + "\n")
    return verdict
