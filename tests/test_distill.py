"""Knowledge distillation (jaxft/distill.py): the chunked KL term against a float64 numpy reference, students
that move toward their teachers in real runs, and the mistakes refused before any weights load."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import AutoTokenizer

from jaxft import data as data_lib
from jaxft import distill, peft, sharding, trainer
from jaxft.config import validate
from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules
from jaxft.peft.peft_format import load_lora_adapter, save_lora_adapter
from jaxft.peft.select import split_model
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config
from tests.tiny_hf import save_tiny_model

QUICKSTART_VOCAB = 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- the loss against numpy


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_objective(student, teacher, targets, weights, temperature, alpha):
    """(objective sum, data loss sum, KL sum) in float64: the formula of jaxft/distill.py written out."""
    ce = -np.take_along_axis(_log_softmax(student), targets[..., None], axis=-1)[..., 0]
    log_p, log_q = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    objective = alpha * temperature**2 * kl + (1 - alpha) * ce
    return (weights * objective).sum(), (weights * ce).sum(), (weights * kl).sum()


def _finite_difference_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (f(up) - f(down)) / (2 * eps)
    return grad


def _identity_head():
    return (lambda params, h: h), {}


@pytest.mark.parametrize("temperature, alpha", [(2.5, 0.7), (1.0, 1.0), (4.0, 0.0)])
@pytest.mark.parametrize("chunk_size", [3, 7], ids=["chunked", "one-chunk"])
def test_objective_and_its_gradient_match_numpy(temperature, alpha, chunk_size):
    # Identity heads: the hidden states are the logits, so the gradient is the one with respect to the logits.
    rng = np.random.default_rng([int(temperature * 10), int(alpha * 10), chunk_size])
    batch, length, vocab = 2, 7, 11
    student = rng.normal(scale=2.0, size=(batch, length, vocab))
    teacher = rng.normal(scale=2.0, size=(batch, length, vocab))
    targets = rng.integers(0, vocab, size=(batch, length))
    weights = (rng.random((batch, length)) > 0.3).astype(np.float64)  # a masked prompt, padding
    weights[0, 0], weights[1, -1] = 0.0, 1.0
    spec = distill.DistillSpec(temperature, alpha)

    def ours(s, t):
        total, parts = distill.chunked_sums(_identity_head(), _identity_head(), s, t, jnp.asarray(targets),
                                            jnp.asarray(weights, jnp.float32), spec, chunk_size=chunk_size)
        return total, parts

    s32, t32 = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    (total, parts), (d_student, d_teacher) = jax.jit(
        jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(s32, t32)

    expected_total, expected_ce, expected_kl = _numpy_objective(student, teacher, targets, weights, temperature,
                                                                alpha)
    np.testing.assert_allclose(float(total), expected_total, rtol=2e-5)
    np.testing.assert_allclose(float(parts["data_loss"]), expected_ce, rtol=2e-5)
    np.testing.assert_allclose(float(parts["distill_kl"]), expected_kl, rtol=2e-5, atol=1e-6)
    expected_grad = _finite_difference_grad(
        lambda s: _numpy_objective(s, teacher, targets, weights, temperature, alpha)[0], student)
    np.testing.assert_allclose(np.asarray(d_student), expected_grad, atol=2e-5, rtol=1e-4)
    assert not np.any(np.asarray(d_student)[weights == 0])  # masked positions get no gradient
    np.testing.assert_array_equal(np.asarray(d_teacher), 0.0)  # the teacher is a constant


def test_chunked_heads_match_autodiff_of_full_logits():
    # Real heads of different widths (a student of hidden 8, a teacher of hidden 12): the chunked objective's
    # gradient for the student's hidden states and head equals JAX's autodiff of the materialised logits.
    rng = np.random.default_rng(3)
    batch, length, vocab, dim, teacher_dim = 2, 13, 17, 8, 12
    params = {"w": jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)}
    teacher_params = {"w": jnp.asarray(rng.normal(size=(teacher_dim, vocab)), jnp.float32)}
    hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
    teacher_hidden = jnp.asarray(rng.normal(size=(batch, length, teacher_dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    weights = jnp.asarray(rng.random((batch, length)) > 0.25, jnp.float32)
    spec = distill.DistillSpec(temperature=1.7, alpha=0.6)

    def head(p, h):
        return h @ p["w"]

    def ours(p, h):
        return distill.chunked_sums((head, p), (head, teacher_params), h, teacher_hidden, targets, weights, spec,
                                    chunk_size=4)[0]

    def full_logits(p, h):
        s, t = head(p, h), head(teacher_params, teacher_hidden)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(s), targets[..., None], axis=-1)[..., 0]
        log_p, log_q = jax.nn.log_softmax(t / spec.temperature), jax.nn.log_softmax(s / spec.temperature)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        return jnp.sum(weights * (spec.alpha * spec.temperature**2 * kl + (1 - spec.alpha) * ce))

    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(params, hidden)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(full_logits, argnums=(0, 1)))(params, hidden)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grads[0]["w"], ref_grads[0]["w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- runs


def _with_quickstart_tokenizer(directory):
    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART / "model" / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def qwen_teacher(tmp_path_factory):
    """A tiny random Qwen2 with the quickstart's vocabulary and tokenizer: another family than the student."""
    directory = save_tiny_model("qwen2", tmp_path_factory.mktemp("teacher"), vocab_size=QUICKSTART_VOCAB)
    return _with_quickstart_tokenizer(directory)


@pytest.fixture(scope="module")
def teacher_adapter(tmp_path_factory):
    """A LoRA adapter for the quickstart model with random A and B, so it changes the model's predictions."""
    model = load_pretrained(str(QUICKSTART / "model"))
    config = LoRAConfig(rank=4, alpha=8.0, targets="q_proj,v_proj,down_proj")
    wrapped = apply_lora(model, config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for module in lora_modules(model).values():
        b = module.lora_b.get_value()
        module.lora_b.set_value(jnp.asarray(rng.normal(scale=0.3, size=b.shape), b.dtype))
    return save_lora_adapter(model, tmp_path_factory.mktemp("adapter"), config, wrapped)


@pytest.fixture(scope="module")
def eight_rows(tmp_path_factory):
    """The first 8 quickstart rows: with 4 rows a step, each logging window of 2 steps is one epoch over the
    same rows, so the logged KLs of two windows compare the student on the same tokens."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join((QUICKSTART / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    return path


def _distill_config(teacher, train=QUICKSTART / "train.jsonl", **overrides):
    c = small_config(**{"train.steps": 8, "train.log_every_steps": 2, "optim.schedule": "constant",
                        "optim.warmup_steps": 0, "checkpoint.every_steps": 100, **overrides})
    c.data.train, c.data.eval = str(train), None  # the KL is logged with the training loss: no evaluations
    c.train.distill.teacher = str(teacher)
    c.train.distill.alpha = 1.0  # the teacher alone: the KL is the whole loss
    c.train.distill.temperature = 2.0
    c.model.loss_chunk = 16  # several chunks per 64-token row
    return c


def _train_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "distill_kl" in r]


def _assert_kl_falls(records, temperature=2.0):
    kls = [r["distill_kl"] for r in records]
    assert kls[-1] < 0.6 * kls[0], kls
    for r in records:  # alpha = 1: the loss is T^2 KL; the data loss is watched, not trained
        assert r["loss"] == pytest.approx(temperature**2 * r["distill_kl"], rel=1e-4)
        assert r["data_loss"] > 0


def test_lora_student_moves_toward_another_familys_teacher(tmp_path, qwen_teacher, eight_rows):
    # Two micro-batches a step: the KL and the data loss are summed over both, as the loss is.
    trainer.run(_distill_config(qwen_teacher, eight_rows, **{"optim.grad_accum_steps": 2}), tmp_path)
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    _assert_kl_falls(records)
    # The teacher never joins what is trained or saved: the exported adapter is the student's LoRA alone.
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8


@pytest.mark.slow
def test_full_student_learns_a_teacher_adapter(tmp_path, teacher_adapter, eight_rows):
    # Teacher: the quickstart model with a LoRA adapter merged in; student: the same base, fully fine-tuned.
    # Where they start apart is the adapter's doing, and full fine-tuning can close the gap.
    c = _distill_config(QUICKSTART / "model", eight_rows, **{"peft.method": "full", "optim.lr": 5e-4})
    c.train.distill.teacher_adapter = str(teacher_adapter)
    trainer.run(c, tmp_path)
    records = _train_records(tmp_path)
    assert records[0]["distill_kl"] > 0.02, records  # the adapter changed the teacher
    _assert_kl_falls(records)


def test_teacher_adapter_is_merged_into_the_teacher(teacher_adapter):
    c = _distill_config(QUICKSTART / "model")
    c.train.distill.teacher_adapter = str(teacher_adapter)
    teacher = distill.load_teacher(c, QUICKSTART / "model", sharding.make_mesh(c.mesh), dtype=jnp.float32,
                                   param_dtype=jnp.float32, layer_loop="unroll")
    assert not lora_modules(teacher.model)  # folded into the weights: a plain model runs each step
    with_adapter, base = load_pretrained(str(QUICKSTART / "model")), load_pretrained(str(QUICKSTART / "model"))
    load_lora_adapter(with_adapter, teacher_adapter)  # applied as LoRA layers, not merged
    ids = jnp.asarray(np.random.default_rng(0).integers(3, QUICKSTART_VOCAB, (2, 12)))
    logits = _jit_logits(teacher.model, ids)
    np.testing.assert_allclose(logits, _jit_logits(with_adapter, ids), atol=1e-4)
    assert np.abs(logits - _jit_logits(base, ids)).max() > 0.1  # and the adapter matters
    assert (teacher.spec.temperature, teacher.spec.alpha) == (2.0, 1.0)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_step(qwen_teacher, eight_rows):
    # Two micro-batches of 2 rows against one batch of 4: the same loss, KL, data loss and update.
    c = _distill_config(qwen_teacher, eight_rows, **{"optim.grad_accum_steps": 2})
    c.train.distill.alpha = 0.4
    mesh = sharding.make_mesh(c.mesh)
    model = load_pretrained(c.model.path)
    method = peft.prepare(model, c.peft, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, method.trainable)
    teacher = distill.load_teacher(c, qwen_teacher, mesh, dtype=jnp.float32, param_dtype=jnp.float32,
                                   layer_loop="unroll")
    batch = data_lib.load(c, AutoTokenizer.from_pretrained(c.model.path)).train.batch(0)
    tx = optax.sgd(0.1)

    def step(accum_steps):
        state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
        fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 0.1,
                                       accum_steps=accum_steps, dropout_key=jax.random.key(0), loss_chunk=0,
                                       distill=teacher.spec))
        return fn(state, frozen, batch, teacher.state)

    (one_state, one), (two_state, two) = step(1), step(2)
    for key in ("loss", "distill_kl", "data_loss", "target_tokens"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5)
    np.testing.assert_allclose(one["loss"], 0.4 * 4.0 * one["distill_kl"] + 0.6 * one["data_loss"], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), two_state["params"],
                 one_state["params"])


def _jit_logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state))


# ----------------------------------------------------------------------------- mistakes


def test_missing_teacher_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"train\.distill\.teacher=.*does not exist"):
        trainer.run(_distill_config(tmp_path / "no_such_teacher"), tmp_path / "run")


def test_teacher_with_another_vocabulary_size_is_refused(tmp_path):
    teacher = save_tiny_model("llama", tmp_path / "teacher")  # vocab_size 128
    with pytest.raises(ModelLoadError, match=r"vocab_size 128, the student .* 1024"):
        trainer.run(_distill_config(teacher), tmp_path / "run")


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    teacher = _with_quickstart_tokenizer(save_tiny_model("llama", tmp_path / "teacher", vocab_size=QUICKSTART_VOCAB))
    # The same size, but two tokens trade ids: every distribution would be compared against the wrong tokens.
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelLoadError, match=r"another tokenizer than the student: .* 2 stand for other tokens"):
        trainer.run(_distill_config(teacher), tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    ({"peft.task": "sequence_classification", "data.format": "classification"},
     r"peft.task=sequence_classification trains a label head"),
    ({"train.distill.alpha": 1.5}, r"train.distill.alpha=1.5 must be in \[0, 1\]"),
    ({"train.distill.temperature": 0.0}, r"train.distill.temperature=0.0 must be > 0"),
    ({"train.distill.teacher": None, "train.distill.teacher_adapter": "adapter/"}, r"set train.distill.teacher"),
])
def test_bad_distillation_settings_are_refused(overrides, message):
    c = _distill_config(QUICKSTART / "model")
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = c
        for section in sections:
            node = node[section]
        node[name] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)
