"""Sequence classification heads (peft.task=sequence_classification): encoding, runs that learn a balanced
three-way task, and exports that transformers (+ peft) load with the same label logits."""

import json
import re

import numpy as np
import pytest

from jaxft import data as data_lib
from jaxft import peft, trainer
from jaxft.config import validate
from jaxft.errors import AdapterError, ConfigError, DataError, ModelLoadError
from jaxft.models import hf
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config

LABELS = ["arithmetic", "country", "words"]


def _topic(question: str) -> str:
    if re.search(r"\b(plus|minus|take away|add|subtract|compute|times|sum|how much)\b", question, re.I):
        return "arithmetic"
    if re.search(r"\b(list|reverse|word|words|letters?)\b", question, re.I):
        return "words"
    return "country"


def _topic_rows(split: str, per_label: int) -> list[dict]:
    """The quickstart's questions labelled by topic, `per_label` of each label (chance is one in three)."""
    rows, counts = [], dict.fromkeys(LABELS, 0)
    for line in (QUICKSTART / f"{split}.jsonl").read_text().splitlines():
        question = json.loads(line)["prompt"].split("\n")[1]
        label = _topic(question)
        if counts[label] < per_label:
            rows.append({"text": question, "label": label})
            counts[label] += 1
    return rows


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("topics")
    for split, per_label in (("train", 32), ("eval", 10)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _topic_rows(split, per_label)))
    return directory


def _config(topic_data, **overrides):
    settings = {"data.train": str(topic_data / "train.jsonl"), "data.eval": str(topic_data / "eval.jsonl"),
                "peft.task": "sequence_classification", "eval.metrics": "accuracy,f1", "train.steps": 24,
                "train.batch_size": 8, "eval.every_steps": 24, "eval.max_batches": None, "optim.lr": 3e-3}
    return small_config(**{**settings, **overrides})


def _final_answers(workdir):
    lines = sorted((workdir / "eval").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))[-1]
    return [json.loads(line) for line in lines.read_text().splitlines()[1:]]


def _torch_logits(model, tokenizer, texts) -> np.ndarray:
    import torch
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # right-padded, as transformers pools
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def test_rows_for_a_head_are_the_text_alone_with_the_label_id(topic_data):
    config = _config(topic_data)
    tokenizer = hf.load_tokenizer(config.model.path)
    data = data_lib.load(config, tokenizer)
    ex = data.train.examples
    assert data.label_names == LABELS
    ids, mask = ex.get(0)
    assert list(ids) == tokenizer(_topic_rows("train", 32)[0]["text"])["input_ids"]  # as at inference: no EOS
    assert not mask.any() and len(ex.labels) == len(ex)
    batch = data.train.batch(0)
    assert batch["labels"].shape == (8,) and set(batch["labels"]) <= {0, 1, 2}
    padded = data_lib.pad_batch(ex, [0, 1], 64, 0, batch_size=4)
    assert list(padded["labels"]) == [ex.labels[0], ex.labels[1], -1, -1]  # padding rows carry no label
    as_text = data_lib.load(_config(topic_data, **{"peft.task": "causal_lm"}), tokenizer)
    assert as_text.train.examples.loss_mask.any() and len(as_text.train.examples.tokens) > len(ex.tokens)


def test_lora_head_learns_and_loads_in_transformers_and_peft(topic_data, tmp_path):
    import peft as hf_peft
    import transformers
    run = tmp_path / "run"
    trainer.run(_config(topic_data, **{"export.merged": True}), run)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval_accuracy"] >= 0.8  # chance: 1/3
    adapter = run / "export" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier", "score"]
    assert not json.loads((adapter / "vllm.json").read_text())["servable"]  # vLLM takes no modules_to_save
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {"0": "arithmetic", "1": "country",
                                                                             "2": "words"}
    answers = _final_answers(run)
    texts = [a["prompt"] for a in answers]
    tokenizer = transformers.AutoTokenizer.from_pretrained(QUICKSTART / "model")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        QUICKSTART / "model", num_labels=3, pad_token_id=tokenizer.pad_token_id)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, adapter).eval()
    expected = np.array([a["logits"] for a in answers])
    np.testing.assert_allclose(_torch_logits(with_adapter, tokenizer, texts), expected, atol=2e-4)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(run / "export" / "model").eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    np.testing.assert_allclose(_torch_logits(merged, tokenizer, texts), expected, atol=2e-4)
    with pytest.raises(AdapterError, match="sequence classification adapter"):
        from jaxft.peft.peft_format import load_lora_adapter
        load_lora_adapter(hf.load_pretrained(QUICKSTART / "model"), adapter)


def test_full_fine_tuning_exports_a_transformers_classifier(topic_data, tmp_path):
    import transformers
    run = tmp_path / "run"
    last = trainer.run(_config(topic_data, **{"peft.method": "full", "optim.lr": 1e-3}), run)
    assert last["eval_accuracy"] >= 0.8
    model = transformers.AutoModelForSequenceClassification.from_pretrained(run / "export" / "model").eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.label2id["words"] == 2
    answers = _final_answers(run)
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "export" / "model")
    np.testing.assert_allclose(_torch_logits(model, tokenizer, [a["prompt"] for a in answers]),
                               np.array([a["logits"] for a in answers]), atol=2e-4)
    # The exported classifier trains on: its head is loaded, not drawn anew.
    again = hf.load_pretrained(run / "export" / "model", num_labels=3)
    np.testing.assert_array_equal(np.asarray(again.score.kernel[...]).T, model.score.weight.detach().numpy())
    with pytest.raises(ModelLoadError, match="3 labels, not 2"):
        hf.load_pretrained(run / "export" / "model", num_labels=2)
    with pytest.raises(ModelLoadError, match="peft.task=sequence_classification"):
        hf.load_pretrained(run / "export" / "model", num_labels=0)


def test_qlora_keeps_the_head_in_float_and_trains_it_with_the_adapter():
    from flax import nnx

    from jaxft.peft.quant import QuantSpec, quantized_modules
    config = small_config(**{"peft.method": "qlora", "peft.task": "sequence_classification"})
    model = hf.load_pretrained(config.model.path, num_labels=4, seed=1,
                               on_param=QuantSpec.from_config(config.peft).on_param)
    method = peft.prepare(model, config.peft, rngs=nnx.Rngs(0))
    assert "score" not in quantized_modules(model) and model.score.kernel[...].shape == (128, 4)
    assert method.trainable.is_trainable("score.kernel") and not method.trainable.is_trainable(
        "model.layers.0.mlp.up_proj.base_layer.codes")
    assert not any(name.startswith("score") for name in method.wrapped)  # the head is not a LoRA target
    drawn = np.asarray(model.score.kernel[...])
    assert 0.01 < drawn.std() < 0.03  # transformers' initializer_range, 0.02


@pytest.mark.parametrize("overrides, error, match", [
    ({"peft.method": "adapter"}, ConfigError, "cannot carry one"),
    ({"data.packing": True}, ConfigError, "data.packing"),
    ({"data.format": "prompt_completion"}, ConfigError, "data.format=classification"),
    ({"peft.task": "regression"}, ConfigError, "peft.task"),
])
def test_bad_classification_settings_are_named(overrides, error, match):
    with pytest.raises(error, match=match):
        validate(small_config(**{"peft.task": "sequence_classification", **overrides}))


def test_a_head_on_data_without_labels_is_refused(tmp_path):
    with pytest.raises(DataError, match="trains a head on labels"):
        trainer.run(small_config(**{"peft.task": "sequence_classification"}), tmp_path)


def test_a_streamed_classification_set_carries_its_labels(topic_data):
    config = _config(topic_data, **{"data.streaming": True, "data.labels": ",".join(LABELS),
                                    "data.shuffle_buffer": 1})
    tokenizer = hf.load_tokenizer(config.model.path)
    stream = data_lib.load(config, tokenizer).train
    (_, batch, _), = stream.batches(0, 1)
    rows = _topic_rows("train", 32)[:8]  # a one-row buffer keeps the file's order
    assert list(batch["labels"]) == [LABELS.index(r["label"]) for r in rows]
    assert list(batch["input_ids"][0][:batch["attention_mask"][0].sum()]) == tokenizer(rows[0]["text"])["input_ids"]


@pytest.mark.slow
def test_a_head_trains_on_a_mesh_as_on_one_device(topic_data, tmp_path):
    """fsdp=2 x tensor=2 over 4 fake devices (another process): the losses and the exported adapter and head of
    the one-device run (SGD: module doc of tests/test_sharding.py says why)."""
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from tests.conftest import ROOT
    settings = {"train.steps": 6, "eval.every_steps": 3, "optim.name": "sgd", "optim.momentum": 0.9,
                "optim.lr": 0.05}
    trainer.run(_config(topic_data, **settings), tmp_path / "one")
    child = ("import json, pathlib, sys; from jaxft import trainer; from tests.test_classification import _config; "
             "trainer.run(_config(pathlib.Path(sys.argv[1]), **json.loads(sys.argv[2])), sys.argv[3])")
    meshed = {**settings, "mesh.fsdp": 2, "mesh.tensor": 2}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", child, str(topic_data), json.dumps(meshed), str(tmp_path / "mesh")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return np.array([r[k] for r in records for k in ("loss", "eval_loss") if k in r])
    np.testing.assert_allclose(losses(tmp_path / "mesh"), losses(tmp_path / "one"), rtol=1e-5)
    ours, theirs = (load_file(str(run / "export" / "adapter" / "adapter_model.safetensors"))
                    for run in (tmp_path / "mesh", tmp_path / "one"))
    assert ours.keys() == theirs.keys() and "base_model.model.score.weight" in ours
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    logits = [np.array([a["logits"] for a in _final_answers(run)]) for run in (tmp_path / "mesh", tmp_path / "one")]
    np.testing.assert_allclose(*logits, atol=1e-4)  # the head's eval labels, read from the mesh
