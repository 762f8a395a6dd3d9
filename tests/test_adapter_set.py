"""Several LoRA adapters on one base: switching gives each one's logits; their weighted combination is what
PEFT's add_weighted_adapter builds, and loads in peft and in jaxft to the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import AdapterError
from jaxft.models.hf import load_pretrained
from jaxft.peft.adapter_set import AdapterSet, weighted_adapter
from jaxft.peft.peft_format import load_lora_adapter
from tests.tiny_hf import load_torch_model, save_tiny_model, torch_logits

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9)).astype(np.int32)
SETTINGS = {  # two adapters as two tasks would leave them: other targets, ranks and scales
    "linear": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               dict(r=4, lora_alpha=16, target_modules=["v_proj", "down_proj"])],
    "cat": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True)],
}
WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("base"), seed=3)


def _peft_adapters(base, directory, settings):
    """Random (not zero) PEFT adapters for `base`, saved; their directories."""
    import peft
    import torch
    dirs = []
    for i, kwargs in enumerate(settings):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(load_torch_model(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        model.save_pretrained(directory / f"adapter_{i}")
        dirs.append(directory / f"adapter_{i}")
    return dirs


def _jaxft_logits(model):
    return np.asarray(model(jnp.asarray(IDS)))


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_a_weighted_combination_equals_peft_add_weighted_adapter(base, tmp_path, combination):
    import peft
    dirs = _peft_adapters(base, tmp_path, SETTINGS[combination])
    reference = peft.PeftModel.from_pretrained(load_torch_model(base), dirs[0], adapter_name="a")
    reference.load_adapter(dirs[1], adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], WEIGHTS, "combined", combination_type=combination)
    reference.set_adapter("combined")
    expected = torch_logits(reference, IDS)

    ours = weighted_adapter(dirs, WEIGHTS, tmp_path / "combined", combination)
    loaded = peft.PeftModel.from_pretrained(load_torch_model(base), ours)
    np.testing.assert_allclose(torch_logits(loaded, IDS), expected, atol=1e-5)
    model = load_pretrained(base)
    load_lora_adapter(model, ours)
    np.testing.assert_allclose(_jaxft_logits(model), expected, atol=1e-4)


def test_switching_adapters_gives_each_ones_logits(base, tmp_path):
    import peft
    dirs = _peft_adapters(base, tmp_path, SETTINGS["cat"])
    model = load_pretrained(base)
    adapters = AdapterSet(model)
    for name, directory in zip(("first", "second"), dirs):
        adapters.add(name, directory)
    for name, directory in [("second", dirs[1]), ("first", dirs[0]), ("second", dirs[1])]:
        adapters.activate(name)
        expected = torch_logits(peft.PeftModel.from_pretrained(load_torch_model(base), directory), IDS)
        np.testing.assert_allclose(_jaxft_logits(model), expected, atol=1e-4)
    adapters.activate(None)
    np.testing.assert_allclose(_jaxft_logits(model), torch_logits(load_torch_model(base), IDS), atol=1e-4)
    with pytest.raises(AdapterError, match="No adapter named 'third'.*added: \\['first', 'second'\\]"):
        adapters.activate("third")


def test_combinations_that_cannot_be_made_are_named(base, tmp_path):
    dirs = _peft_adapters(base, tmp_path, SETTINGS["cat"])
    with pytest.raises(AdapterError, match=r"ranks must agree \(got \[4, 2\]\); use combination='cat'"):
        weighted_adapter(dirs, WEIGHTS, tmp_path / "x", "linear")
    with pytest.raises(AdapterError, match="one weight per adapter"):
        weighted_adapter(dirs, [1.0], tmp_path / "x")
    with pytest.raises(AdapterError, match="'svd' is not one of"):
        weighted_adapter(dirs, WEIGHTS, tmp_path / "x", "svd")


@pytest.mark.slow
def test_two_adapters_trained_on_different_tasks_switch_and_merge(tmp_path):
    """The acceptance case end to end: LoRA runs on two tasks (the quickstart's questions; their topics as a
    label to write) give two adapters for one base. Loaded together, switching gives each run's own logits
    as peft has them; their linear combination loads in peft with the logits of PEFT's own combination."""
    import json

    import peft

    from jaxft import trainer
    from tests.conftest import QUICKSTART
    from tests.test_classification import _topic_rows
    from tests.test_trainer import small_config
    topics = tmp_path / "topics.jsonl"
    topics.write_text("".join(json.dumps(r) + "\n" for r in _topic_rows("train", 16)))
    tasks = {"answers": {}, "topics": {"data.train": str(topics), "data.eval": None, "data.format": "classification"}}
    dirs = {}
    for name, overrides in tasks.items():
        trainer.run(small_config(**{"train.steps": 4, "eval.every_steps": 0, **overrides}), tmp_path / name)
        dirs[name] = tmp_path / name / "export" / "adapter"
    base = QUICKSTART / "model"
    ids = np.random.default_rng(1).integers(0, 1024, size=(2, 9)).astype(np.int32)

    model = load_pretrained(base)
    adapters = AdapterSet(model)
    for name, directory in dirs.items():
        adapters.add(name, directory)
    runs = {}
    for name in ["topics", "answers", "topics"]:
        adapters.activate(name)
        runs[name] = torch_logits(peft.PeftModel.from_pretrained(load_torch_model(base), str(dirs[name])), ids)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), runs[name], atol=1e-4)
    assert np.abs(runs["answers"] - runs["topics"]).max() > 1e-2  # two different adapters, really

    reference = peft.PeftModel.from_pretrained(load_torch_model(base), str(dirs["answers"]), adapter_name="a")
    reference.load_adapter(str(dirs["topics"]), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.5, 0.5], "both", combination_type="linear")
    reference.set_adapter("both")
    combined = weighted_adapter(list(dirs.values()), [0.5, 0.5], tmp_path / "both", "linear")
    loaded = peft.PeftModel.from_pretrained(load_torch_model(base), str(combined))
    np.testing.assert_allclose(torch_logits(loaded, ids), torch_logits(reference, ids), atol=1e-5)
