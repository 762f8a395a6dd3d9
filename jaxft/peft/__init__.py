"""Fine-tuning methods. Each turns a loaded model into one ready to train and
names what trains through a single `TrainableFilter` (select.py)."""

import dataclasses
import functools
import re
from typing import Callable

from flax import nnx

from jaxft.models import layout
from jaxft.peft import adapters, bitfit, partial, prompt, quant
from jaxft.peft.lora import LoRAConfig, apply_lora
from jaxft.peft.lora import trainable_filter as lora_filter
from jaxft.peft.select import TrainableFilter, uniform_groups


@dataclasses.dataclass(frozen=True)
class Method:
    """What `prepare` did to the model: the filter, and for LoRA its config and wrapped modules.

    `start_step(name)` is the step a trainable parameter starts to train (gradual
    unfreezing; None when everything trains from step 0).
    """

    name: str
    trainable: TrainableFilter
    lora: LoRAConfig | None = None
    wrapped: tuple[str, ...] = ()
    start_step: Callable[[str], int] | None = None


def lora_config(peft_cfg) -> LoRAConfig:
    return LoRAConfig(rank=peft_cfg.rank, alpha=float(peft_cfg.alpha), dropout=float(peft_cfg.dropout),
                      targets=peft_cfg.targets, use_rslora=peft_cfg.use_rslora, use_dora=peft_cfg.use_dora,
                      kernel=peft_cfg.kernel)


def prepare(model: nnx.Module, peft_cfg, *, rngs: nnx.Rngs, tokenizer=None) -> Method:
    """Apply `config.peft` to `model` in place and return what trains.

    `tokenizer` is needed only to initialise prompt tuning from text. The model's stacked decoder
    blocks are split where the method treats layers differently (select.uniform_groups), so that
    each group can still run under one scan.
    """
    method = _apply(model, peft_cfg, rngs=rngs, tokenizer=tokenizer)
    if getattr(model.config, "num_labels", 0):  # a classifier's head trains whole (PEFT: modules_to_save)
        head = rf"{re.escape(layout.of(model).classifier)}\..*"
        method = dataclasses.replace(method, trainable=TrainableFilter(((head, True),) + method.trainable.rules))
    uniform_groups(model, method.trainable, method.start_step)
    return method


def _apply(model: nnx.Module, peft_cfg, *, rngs: nnx.Rngs, tokenizer=None) -> Method:
    if peft_cfg.method in ("lora", "qlora"):
        cfg = lora_config(peft_cfg)
        if peft_cfg.method == "qlora":  # a no-op for a model quantised while loading (trainer.py)
            quant.quantize_model(model, quant.QuantSpec.from_config(peft_cfg))
        wrapped = apply_lora(model, cfg, rngs=rngs)
        return Method(peft_cfg.method, lora_filter(), cfg, tuple(wrapped))
    if peft_cfg.method == "full":
        return Method("full", TrainableFilter(((r".*", True),)))
    if peft_cfg.method == "adapter":
        wrapped = adapters.apply_adapters(model, peft_cfg.adapter_kind, peft_cfg.adapter_size,
                                          peft_cfg.adapter_activation, rngs=rngs)
        return Method("adapter", adapters.trainable_filter(), wrapped=tuple(wrapped))
    if peft_cfg.method == "bitfit":
        return Method("bitfit", bitfit.bitfit_filter(model))
    if peft_cfg.method == "prompt_tuning":
        prompt.apply_prompt_tuning(model, peft_cfg.num_virtual_tokens, init=peft_cfg.prompt_init,
                                   init_text=peft_cfg.prompt_init_text, tokenizer=tokenizer, rngs=rngs)
        return Method("prompt_tuning", prompt.trainable_filter())
    if peft_cfg.method == "partial":
        layers, names = model.config.num_layers, layout.of(model)
        start = functools.partial(partial.unfreeze_step, cfg=peft_cfg, num_layers=layers, layout=names)
        return Method("partial", partial.partial_filter(peft_cfg, layers, names),
                      start_step=start if peft_cfg.unfreeze_every_steps else None)
    raise AssertionError(f"unvalidated peft.method {peft_cfg.method!r}")
