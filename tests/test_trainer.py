"""End-to-end training on the shipped quickstart model (tiny), small batches."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft import trainer
from jaxft.errors import DataError, TrainingDivergedError
from jaxft.models.hf import load_pretrained
from tests.conftest import QUICKSTART, ROOT

sys.path.insert(0, str(ROOT / "configs"))
import quickstart  # noqa: E402


def small_config(**overrides):
    c = quickstart.get_config()
    c.model.path, c.data.train, c.data.eval = (str(QUICKSTART / f) for f in ("model", "train.jsonl", "eval.jsonl"))
    c.train.steps, c.train.batch_size, c.train.seq_len = 6, 4, 64
    c.train.log_every_steps, c.train.progress_bar = 2, False
    c.eval.every_steps, c.eval.max_batches = 3, 2
    c.checkpoint.every_steps, c.checkpoint.async_save = 3, False
    c.optim.warmup_steps = 2
    c.eval.metrics = ""  # no generated answers unless a test asks for them (they cost seconds per evaluation)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _adapter(workdir):
    return load_file(str(workdir / "export" / "adapter" / "adapter_model.safetensors"))


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_everything(tmp_path):
    trainer.run(small_config(), tmp_path)
    records = _records(tmp_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(np.isclose(r["eval_perplexity"], np.exp(r["eval_loss"])) for r in evals)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert any(np.abs(v).max() > 0 for k, v in _adapter(tmp_path).items() if "lora_B" in k)
    assert json.loads((tmp_path / "export" / "adapter" / "vllm.json").read_text())["servable"]


def test_frozen_weights_unchanged_and_optimizer_state_only_for_trainables():
    c = small_config()
    model = load_pretrained(c.model.path)
    from flax import nnx

    from jaxft import peft
    from jaxft.optim import build_optimizer
    from jaxft.peft.select import split_model

    method = peft.prepare(model, c.peft, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, method.trainable)
    tx = build_optimizer(c.optim, 10)
    opt_state = tx.init(params)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert state_bytes == 2 * param_bytes  # Adam's mu and nu, for trainable parameters only

    import functools

    from transformers import AutoTokenizer

    from jaxft import data as data_lib
    tok = AutoTokenizer.from_pretrained(c.model.path)
    batch = data_lib.load(c, tok).train.batch(0)
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-3,
                                     accum_steps=1, dropout_key=jax.random.key(0)))
    frozen_before = jax.tree.map(np.array, frozen)
    state = dict(step=np.int32(0), params=params, opt_state=opt_state, nonfinite_step=np.int32(-1))
    for _ in range(2):
        state, _ = step(state, frozen, batch)
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, state["params"])
    assert any(jax.tree.leaves(changed))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    trainer.run(small_config(**{"train.steps": 2, "optim.grad_accum_steps": 1}), tmp_path / "a")
    trainer.run(small_config(**{"train.steps": 2, "optim.grad_accum_steps": 2}), tmp_path / "b")
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_epochs_and_dropout(tmp_path):
    c = small_config(**{"train.steps": None, "train.epochs": 1, "peft.dropout": 0.2, "train.batch_size": 64,
                        "train.log_every_steps": 100})
    trainer.run(c, tmp_path)
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert steps == [2581 // 64]  # one epoch of full batches, logged at the end


def test_full_finetuning_exports_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM
    trainer.run(small_config(**{"peft.method": "full", "train.steps": 2, "optim.lr": 1e-3}), tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(QUICKSTART / "model"))
    diffs = [not np.allclose(p.detach().numpy(), q.detach().numpy())
             for p, q in zip(exported.parameters(), base.parameters())]
    assert all(diffs)  # every tensor trained


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = small_config(**{"optim.name": "sgd", "optim.lr": 1e30, "optim.clip_norm": 0.0,
                        "optim.schedule": "constant", "optim.warmup_steps": 0,
                        "checkpoint.every_steps": 1, "train.steps": 20})
    with pytest.raises(TrainingDivergedError, match="NaN/Inf at step"):
        trainer.run(c, tmp_path)
    from jaxft.checkpoint import Checkpointer
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False)
    restored = ckpt.manager.restore(ckpt.latest_step())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["state"]["params"]))
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_parameters(tmp_path):
    # 40 packed examples make ~20 rows: 5 steps per epoch, so the resume at step 8 crosses epoch boundaries.
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join((QUICKSTART / "train.jsonl").read_text().splitlines()[:40]) + "\n")
    overrides = {"train.steps": 40, "checkpoint.every_steps": 4, "eval.every_steps": 0, "data.train": str(train),
                 "data.packing": True}
    trainer.run(small_config(**overrides), tmp_path / "straight")
    report = json.loads((tmp_path / "straight" / "data_report.json").read_text())
    assert report["packing"]["rows"] // 4 < 8  # the kill below comes after at least one epoch boundary

    workdir = tmp_path / "killed"
    args = [f"--config.{k}={v}" for k, v in {**overrides, "model.path": QUICKSTART / "model",
                                               "data.eval": QUICKSTART / "eval.jsonl",
                                               "train.batch_size": 4, "train.seq_len": 64,
                                               "optim.warmup_steps": 2, "eval.max_batches": 2,
                                               "train.progress_bar": False, "train.log_every_steps": 2,
                                               "checkpoint.async_save": False}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs/quickstart.py"),
                             "--workdir", str(workdir), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "8").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill: {proc.communicate()[1].decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (workdir / "export").exists(), "run ended before the kill"
    assert (workdir / "run.lock").exists()  # left by the killed run: the next start takes it over

    trainer.run(small_config(**overrides), workdir)
    # The rows the killed run logged after its last checkpoint are not repeated.
    assert [r["step"] for r in _records(workdir) if "loss" in r] == list(range(2, 41, 2))
    a, b = _adapter(tmp_path / "straight"), _adapter(workdir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    losses = lambda w: {r["step"]: r["loss"] for r in _records(w) if "loss" in r}  # noqa: E731
    straight, resumed = losses(tmp_path / "straight"), losses(workdir)
    assert all(resumed[s] == straight[s] for s in resumed if s > 8)  # the same batches after the resume


def test_resume_with_other_data_is_refused(tmp_path):
    """The data file edited in place between runs: the config is the same, the batches would not be."""
    data = tmp_path / "train.jsonl"
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()
    data.write_text("\n".join(rows[:80]) + "\n")
    config = small_config(**{"train.steps": 3, "eval.every_steps": 0, "data.train": str(data)})
    trainer.run(config, tmp_path / "run")
    data.write_text("\n".join(rows[:40]) + "\n")
    with pytest.raises(DataError, match="training data .* differ from the run that wrote the checkpoint"):
        trainer.run(config, tmp_path / "run")


@pytest.mark.slow
def test_quickstart_default_cuts_eval_loss_by_30_percent(tmp_path):
    """The README's first command, in process: the embedded default must visibly learn."""
    c = quickstart.get_config()
    c.train.progress_bar = False
    trainer.run(c, tmp_path)
    evals = [r for r in _records(tmp_path) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] <= 0.7 * evals[0]["eval_loss"], evals
    # It answers its eval questions better, and says so with the answers before and after.
    assert evals[-1]["eval_exact_match"] >= evals[0]["eval_exact_match"] + 0.1, evals
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [f"step_{s}.jsonl" for s in (0, 100, 200, 300)]
    # It drew its curves, and `python -m jaxft.plot` draws them again, a PNG per panel.
    from jaxft import plot
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    plot.main([str(tmp_path), "--out", str(tmp_path / "plots")])
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "curves.png", "loss.png", "lr.png", "grad_norm.png", "tokens_per_sec.png", "eval_exact_match.png"}


def test_loss_sums_match_optax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    loss_mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.int32)

    class Fixed:  # a "model" whose hidden states are the logits and whose head is the identity
        config = types.SimpleNamespace(num_labels=0)  # a language model, not a classifier

        def hidden_states(self, input_ids, **masks_and_positions):
            return jax.numpy.asarray(logits)

        def output_head(self):
            return (lambda params, h: h), {}

    total, count = trainer.loss_sums(Fixed(), dict(input_ids=ids, attention_mask=np.ones_like(ids),
                                                   loss_mask=loss_mask))
    import optax
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    expected = float(np.sum(np.asarray(per_token) * loss_mask[:, 1:]))
    assert float(count) == loss_mask[:, 1:].sum()
    assert float(total) == pytest.approx(expected, rel=1e-5)
