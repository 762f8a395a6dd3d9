"""BERT and RoBERTa sequence classifiers: logits equal transformers', every method that applies trains, the LoRA
adapter loads in peft and the full export in transformers with the same logits, a run learns a three-way task,
and what an encoder cannot do (train as a causal LM, generate) is refused with the reason."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxft import peft, trainer
from jaxft.config import base_config
from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models import hf
from jaxft.peft.lora import lora_layers
from jaxft.peft.select import split_model
from tests.test_classification import LABELS, _topic_rows
from tests.test_trainer import small_config
from tests.tiny_hf import load_torch_classifier, save_tiny_encoder, save_wordpiece_tokenizer, torch_label_logits

ENCODERS = ("bert", "roberta")
PAD = {"bert": 0, "roberta": 1}


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """model_type -> a saved tiny random *ForSequenceClassification (3 labels, 128 tokens)."""
    return {t: save_tiny_encoder(t, tmp_path_factory.mktemp(t)) for t in ENCODERS}


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("topics")
    for split, per_label in (("train", 32), ("eval", 10)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _topic_rows(split, per_label)))
    return directory


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, topic_data):
    """model_type -> a saved pretraining checkpoint (BertForPreTraining, RobertaForMaskedLM: no classifier) with a
    WordPiece tokenizer over the topic data's words beside it."""
    texts = [json.loads(line)["text"] for split in ("train", "eval")
             for line in (topic_data / f"{split}.jsonl").read_text().splitlines()]
    out = {}
    for model_type in ENCODERS:
        directory = tmp_path_factory.mktemp(f"{model_type}_base")
        tokenizer = save_wordpiece_tokenizer(directory, texts, kind=model_type)
        vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
        out[model_type] = save_tiny_encoder(model_type, directory, kind="pretrained", vocab_size=vocab)
    return out


def _batch(model_type: str, left_padded: bool):
    """Ids `[3, 10]` padded with the model's pad id (row 1 right-padded, row 2 right- or left-padded), the mask,
    and for BERT token types marking a second sentence."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 128, size=(3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    if left_padded:
        mask[2, :3] = 0
    else:
        mask[2, 4:] = 0
    types = np.where(np.arange(10) >= 5, 1, 0)[None].repeat(3, 0) * mask if model_type == "bert" else None
    return np.where(mask == 1, ids, PAD[model_type]).astype(np.int32), mask, types


def _label_logits(model, ids, mask, types=None, **kwargs) -> np.ndarray:
    types = None if types is None else jnp.asarray(types)
    return np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=types,
                                     **kwargs))


@pytest.mark.parametrize("model_type", ENCODERS)
def test_logits_equal_transformers_on_padded_batches(classifiers, model_type):
    model = hf.load_pretrained(classifiers[model_type])
    assert model.config.num_labels == 3
    reference = load_torch_classifier(classifiers[model_type])
    for left_padded in (False, True):
        ids, mask, types = _batch(model_type, left_padded)
        theirs = torch_label_logits(reference, ids, mask, types)
        assert np.abs(theirs).max() > 0.3  # logits large enough for the bound below to mean something
        np.testing.assert_allclose(_label_logits(model, ids, mask, types), theirs, atol=1e-4)
        if not left_padded:  # padding as row lengths, the form the training step passes
            np.testing.assert_allclose(_label_logits(model, ids, mask, types, right_padded=True), theirs, atol=1e-4)


def _with_trained_lora(model, seed: int = 1):
    """Every LoRA B random (A is random already) and the classifier's head changed, as training leaves them."""
    rng = np.random.default_rng(seed)
    for _, module, _ in lora_layers(model):
        module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, module.lora_b.get_value().shape), jnp.float32))
    head = nnx.state(getattr(model, "classifier"), nnx.Param)
    nnx.update(getattr(model, "classifier"), jax.tree.map(lambda v: v + 0.2, head))
    return model


@pytest.mark.parametrize("model_type", ENCODERS)
def test_lora_adapter_loads_in_peft_with_the_same_logits(pretrained, tmp_path, model_type):
    import peft as hf_peft

    from jaxft.peft.peft_format import save_lora_adapter
    cfg = base_config().peft
    cfg.rank = 2
    model = hf.load_pretrained(pretrained[model_type], num_labels=3, seed=1)
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    # PEFT's all-linear for a classifier: every linear of the body (BERT's pooler too), never the head.
    assert any(n.endswith("pooler.dense") for n in method.wrapped) == (model_type == "bert")
    assert not any(n.startswith("classifier") for n in method.wrapped)
    assert method.trainable.is_trainable("classifier.out_proj.bias" if model_type == "roberta" else "classifier.bias")
    _with_trained_lora(model)
    save_lora_adapter(model, tmp_path, method.lora, list(method.wrapped), base_model=str(pretrained[model_type]))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier", "score"]

    base = load_torch_classifier(pretrained[model_type], num_labels=3)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids, mask, types = _batch(model_type, left_padded=False)
    np.testing.assert_allclose(torch_label_logits(with_adapter, ids, mask, types),
                               _label_logits(model, ids, mask, types), atol=1e-4)


@pytest.mark.parametrize("model_type", ENCODERS)
def test_full_export_loads_in_transformers_with_the_same_logits(pretrained, tmp_path, model_type):
    from jaxft.export import save_hf_model
    model = hf.load_pretrained(pretrained[model_type], num_labels=3, seed=2)
    params = nnx.state(model, nnx.Param)  # everything changed, as full fine-tuning leaves it
    nnx.update(model, jax.tree.map(lambda v: v * 1.1 + 0.01, params))
    tokenizer = hf.load_tokenizer(pretrained[model_type])
    save_hf_model(model, tmp_path, pretrained[model_type], tokenizer, LABELS)
    exported = load_torch_classifier(tmp_path)
    assert type(exported).__name__ == f"{'Bert' if model_type == 'bert' else 'Roberta'}ForSequenceClassification"
    assert exported.config.id2label == dict(enumerate(LABELS))
    ids, mask, types = _batch(model_type, left_padded=False)
    np.testing.assert_allclose(torch_label_logits(exported, ids, mask, types), _label_logits(model, ids, mask, types),
                               atol=1e-4)
    # The exported classifier loads back with its own head, not a drawn one, and only with its own label count.
    again = hf.load_pretrained(tmp_path)
    np.testing.assert_allclose(_label_logits(again, ids, mask, types), _label_logits(model, ids, mask, types),
                               atol=1e-6)
    with pytest.raises(ModelLoadError, match="3 labels, not 2"):
        hf.load_pretrained(tmp_path, num_labels=2)


# method overrides -> what must train besides the head (a parameter name), what must stay frozen
METHODS = {
    "lora": ({"method": "lora", "rank": 4, "targets": "query,value"},
             "bert.encoder.layer.1.attention.self.value.lora_b",
             "bert.encoder.layer.1.attention.self.value.base_layer.kernel"),
    "full": ({"method": "full"}, "bert.embeddings.LayerNorm.scale", None),
    "bitfit": ({"method": "bitfit"}, "bert.encoder.layer.0.output.dense.bias",
               "bert.encoder.layer.0.output.dense.kernel"),
    "partial": ({"method": "partial", "train_top_blocks": 1}, "bert.encoder.layer.1.output.LayerNorm.scale",
                "bert.encoder.layer.0.intermediate.dense.kernel"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_what_it_implies(pretrained, name):
    """A few steps on eight rows with random labels through the trainer's step: the loss falls, the head and the
    method's parameters train, frozen weights stay bitwise."""
    overrides, trained, frozen_name = METHODS[name]
    cfg = base_config().peft
    for k, v in overrides.items():
        cfg[k] = v
    model = hf.load_pretrained(pretrained["bert"], num_labels=3, seed=0)
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    assert method.trainable.is_trainable("classifier.kernel") and method.trainable.is_trainable(trained)
    assert frozen_name is None or not method.trainable.is_trainable(frozen_name)

    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None] < rng.integers(4, 13, size=(8, 1))).astype(np.int32)
    batch = dict(input_ids=jnp.asarray(np.where(mask, rng.integers(5, 100, size=(8, 12)), 0), jnp.int32),
                 attention_mask=jnp.asarray(mask), labels=jnp.asarray(rng.integers(0, 3, size=8), jnp.int32))
    graphdef, params, frozen = split_model(model, method.trainable)
    frozen_before = jax.tree.map(np.array, frozen)
    tx = optax.adam(1e-2)
    # Compiling is most of this test's time, and LLVM's optimisations most of compiling: skipped, as the
    # steps' results do not depend on them.
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-2,
                                     accum_steps=1, dropout_key=jax.random.key(0)),
                   compiler_options={"xla_backend_optimization_level": 0})
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))


def test_qlora_quantises_the_body_and_keeps_the_head_in_float(pretrained):
    """RoBERTa's head is two layers (classifier.dense, classifier.out_proj): both stay float and train whole; every
    linear layer of the body is stored quantised under its LoRA adapter."""
    from jaxft.peft.quant import QuantSpec, quantized_modules
    cfg = base_config().peft
    cfg.method, cfg.quant = "qlora", "int8"
    model = hf.load_pretrained(pretrained["roberta"], num_labels=3, on_param=QuantSpec.from_config(cfg).on_param)
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    quantized = quantized_modules(model)
    assert not any(name.startswith("classifier") for name in quantized)
    assert len(method.wrapped) == 2 * 6  # per layer: query, key, value, and the three dense layers
    assert "roberta.encoder.layer.0.intermediate.dense.base_layer" in quantized
    assert method.trainable.is_trainable("classifier.dense.kernel")
    assert method.trainable.is_trainable("classifier.out_proj.kernel")


def test_a_run_learns_topics_and_its_adapter_gives_peft_the_same_logits(pretrained, topic_data, tmp_path):
    """trainer.run end to end on a tiny BERT: rows encoded as its tokenizer encodes them ([CLS] text [SEP]),
    accuracy and F1 from the head, the exported adapter (with labels.json) read by peft with the eval logits."""
    import peft as hf_peft
    import transformers
    run = tmp_path / "run"
    config = small_config(**{
        "model.path": str(pretrained["bert"]), "data.train": str(topic_data / "train.jsonl"),
        "data.eval": str(topic_data / "eval.jsonl"), "peft.task": "sequence_classification",
        "eval.metrics": "accuracy,f1", "train.steps": 24, "train.batch_size": 8, "eval.every_steps": 24,
        "eval.max_batches": None, "optim.lr": 1e-2, "train.seq_len": 32, "checkpoint.every_steps": 24,
        "export.merged": True})
    last = trainer.run(config, run)
    assert last["eval_accuracy"] >= 0.7 and last["eval_f1_macro"] >= 0.6, last  # chance: 1/3
    answers = [json.loads(line) for line in (run / "eval" / "step_24.jsonl").read_text().splitlines()[1:]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained["bert"])
    adapter = run / "export" / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())["id2label"]
    base = load_torch_classifier(pretrained["bert"], num_labels=len(labels), id2label=labels)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, adapter).eval()
    batch = tokenizer([a["prompt"] for a in answers], padding=True, return_tensors="np")
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    expected = np.array([a["logits"] for a in answers])
    np.testing.assert_allclose(torch_label_logits(with_adapter, batch["input_ids"], batch["attention_mask"]),
                               expected, atol=1e-4)
    merged = load_torch_classifier(run / "export" / "model")  # LoRA folded in: a whole BertForSequenceClassification
    np.testing.assert_allclose(torch_label_logits(merged, batch["input_ids"], batch["attention_mask"]), expected,
                               atol=1e-4)


def test_an_encoder_refuses_causal_lm_training_and_generation(pretrained, classifiers, tmp_path, capsys):
    from jaxft.generate import GenerationConfig, generate
    from jaxft.generate.__main__ import main as generate_main
    with pytest.raises(ConfigError, match="bert is an encoder .* peft.task=sequence_classification"):
        trainer.run(small_config(**{"model.path": str(pretrained["bert"])}), tmp_path / "run")
    assert not (tmp_path / "run" / "data_report.json").exists()  # refused before any data was read
    with pytest.raises(ConfigError, match="roberta is an encoder"):
        hf.load_pretrained(pretrained["roberta"])  # no num_labels: a language model is asked for
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--model", str(pretrained["bert"]), "--prompt", "what is two plus two?"])
    assert exit_info.value.code == 2 and "bert is an encoder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="neither generates text"):
        generate(hf.load_pretrained(classifiers["roberta"]), [[0, 7, 9, 2]], GenerationConfig(max_new_tokens=2))
