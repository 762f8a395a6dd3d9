"""vllm.json: whether vLLM can serve an exported adapter (its PEFTHelper's rules), why not, and the command."""

import json
import re

import pytest

from jaxft.peft.lora import LoRAConfig
from jaxft.peft.peft_format import lora_adapter_config
from jaxft.peft.serving import vllm_verdict, write_vllm_verdict

WRAPPED = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def _lora(rank=8, **kwargs):
    return lora_adapter_config(LoRAConfig(rank=rank, alpha=16.0, **kwargs), WRAPPED, "/models/base")


@pytest.mark.parametrize("config, servable, rank, why", [
    (_lora(), True, 16, None),
    (_lora(rank=48), True, 64, None),  # above the default: the next value --max-lora-rank accepts
    (_lora(rank=1024), False, None, "above 512"),
    (_lora(use_dora=True), False, 16, "DoRA"),
    (lora_adapter_config(LoRAConfig(rank=8), WRAPPED, None, classifier=True), False, 16, "modules_to_save"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20}, False, None, "LoRA adapters only"),
    ({"adapter_type": "BOTTLENECK"}, False, None, "'BOTTLENECK'"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, False, 16, "lacks \\['target_modules'\\]"),
])
def test_verdicts_follow_vllms_rules(config, servable, rank, why):
    verdict = vllm_verdict(config)
    assert verdict["servable"] is servable and verdict["max_lora_rank"] == rank
    if why is None:
        assert verdict["why_not"] == []
    else:
        assert any(re.search(why, w) for w in verdict["why_not"]), verdict


def test_rank_above_the_default_and_a_head_target_are_noted():
    verdict = vllm_verdict(lora_adapter_config(LoRAConfig(rank=32), WRAPPED + ["lm_head"], None))
    assert verdict["servable"]
    notes = " ".join(verdict["notes"])
    assert "--max-lora-rank 32" in notes and "lm_head" in notes


def test_the_verdict_is_written_beside_the_adapter_with_a_command(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(_lora()))
    verdict = write_vllm_verdict(tmp_path, "/models/base")
    assert json.loads((tmp_path / "vllm.json").read_text()) == verdict
    assert verdict["command"] == (f"vllm serve /models/base --enable-lora --max-lora-rank 16 "
                                  f"--lora-modules adapter={tmp_path.absolute()}")


def test_a_base_whose_vllm_model_takes_no_lora_is_named():
    gpt2 = lora_adapter_config(LoRAConfig(rank=8), ["transformer.h.0.attn.c_attn"], "/models/gpt2")
    verdict = vllm_verdict(gpt2, "gpt2")
    assert not verdict["servable"] and "GPT-2" in verdict["why_not"][0] and "export.merged" in verdict["why_not"][0]
    assert vllm_verdict(_lora(), "gemma2")["servable"] and vllm_verdict(_lora(), "phi3")["servable"]
