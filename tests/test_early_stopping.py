"""Early stopping on the eval loss and exporting the best evaluation (eval.early_stopping_*, eval.keep_best)."""

import json
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft import trainer
from jaxft.config import validate
from jaxft.errors import ConfigError
from jaxft.stopping import EarlyStopping
from tests.test_trainer import small_config


def _hf_stop_and_best(losses, patience):
    """Hugging Face's EarlyStoppingCallback, driven as its Trainer drives it: the callback sees the best
    metric of the earlier evaluations, then the Trainer updates it (Trainer._determine_best_metric)."""
    from transformers import EarlyStoppingCallback
    callback = EarlyStoppingCallback(early_stopping_patience=patience)
    args = types.SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False)
    state, control = types.SimpleNamespace(best_metric=None), types.SimpleNamespace(should_training_stop=False)
    best_index = None
    for i, loss in enumerate(losses):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if state.best_metric is None or loss < state.best_metric:
            state.best_metric, best_index = loss, i
        if control.should_training_stop:
            return i, best_index
    return None, best_index


def _ours(losses, patience, min_delta=0.0):
    stopper = EarlyStopping(patience, min_delta)
    for i, loss in enumerate(losses):
        stopper.update(i, loss)
        if stopper.should_stop:
            break
    return stopper.stopped_at, stopper.best_step


@pytest.mark.parametrize("seed", range(20))
def test_stopping_and_best_match_hugging_face(seed):
    rng = np.random.default_rng(seed)
    losses = [float(x) for x in np.round(np.cumsum(rng.normal(-0.02, 0.1, 30)) + 3.0, 1)]  # ties included
    patience = int(rng.integers(1, 5))
    assert _ours(losses, patience) == _hf_stop_and_best(losses, patience)


def test_min_delta_compares_with_the_best_not_the_last():
    """Keras' rule: 1.0 -> 0.95 -> 0.9 -> 0.85 improves on 1.0 by more than 0.1 at 0.85 (HF, which moves
    its best at every small gain, would stop there instead)."""
    stopper = EarlyStopping(patience=3, min_delta=0.1)
    for step, loss in enumerate([1.0, 0.95, 0.9, 0.85]):
        stopper.update(step, loss)
    assert not stopper.should_stop and stopper.best_step == 3 and stopper.evals_without_improvement == 0
    restored = EarlyStopping(3, 0.1)
    restored.restore(json.loads(json.dumps(stopper.to_meta())))  # through a checkpoint's JSON meta
    assert restored == stopper


@pytest.mark.parametrize("seed", range(5))
def test_a_score_judged_in_max_mode_is_the_loss_judged_in_min_mode(seed):
    """Higher-is-better (accuracy, BLEU) decides as lower-is-better does on the negated values, HF's rule too."""
    rng = np.random.default_rng(seed)
    scores = [float(x) for x in np.round(rng.uniform(0, 1, 20), 1)]
    patience = int(rng.integers(1, 5))
    stopper = EarlyStopping(patience, mode="max", metric="eval_accuracy")
    for i, score in enumerate(scores):
        stopper.update(i, score)
        if stopper.should_stop:
            break
    assert (stopper.stopped_at, stopper.best_step) == _ours([-x for x in scores], patience)
    assert stopper.best_value == max(scores[:stopper.best_step + 1])


def test_a_resume_judging_another_metric_starts_afresh():
    stopper = EarlyStopping(patience=2, mode="max", metric="eval_exact_match")
    for step, score in enumerate([0.5, 0.4, 0.3]):
        stopper.update(step, score)
    assert stopper.should_stop
    meta = json.loads(json.dumps(stopper.to_meta()))
    same = EarlyStopping(patience=2, mode="max", metric="eval_exact_match")
    same.restore(meta)
    assert same == stopper
    other = EarlyStopping(patience=2, mode="max", metric="eval_bleu")
    other.restore(meta)
    assert other == EarlyStopping(patience=2, mode="max", metric="eval_bleu")
    old = EarlyStopping(patience=3, min_delta=0.0)  # a checkpoint from before modes: best_loss, no metric
    old.restore(dict(best_loss=1.5, best_step=4, evals_without_improvement=1, stopped_at=None))
    assert (old.best_value, old.best_step) == (1.5, 4)


def _run(tmp_path, name, **overrides):
    config = small_config(**{"eval.every_steps": 1, "eval.max_batches": 1, "train.log_every_steps": 1,
                             "checkpoint.every_steps": 1, "checkpoint.keep": 10, **overrides})
    trainer.run(config, tmp_path / name)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return config, records


def _adapter(workdir):
    return load_file(str(workdir / "export" / "adapter" / "adapter_model.safetensors"))


def test_patience_stops_the_run_and_keep_best_exports_the_best_evaluation(tmp_path):
    """min_delta larger than any possible gain: no evaluation after step 0's improves, so patience 2 stops
    the run at step 2 of 6, and the best evaluation is step 0's, whose adapter has B = 0 (LoRA's start).
    Run again, the stopped run trains no further."""
    config, records = _run(tmp_path, "stopped", **{"eval.early_stopping_patience": 2,
                                                   "eval.early_stopping_min_delta": 100.0, "eval.keep_best": True})
    assert max(r["step"] for r in records) == 2 and (tmp_path / "stopped" / "checkpoints" / "2").is_dir()
    adapter = _adapter(tmp_path / "stopped")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and not any(np.any(b) for b in lora_b)  # step 0's parameters, not step 2's
    trainer.run(config, tmp_path / "stopped")
    again = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in again) == 2
    config.eval.early_stopping_patience = 0  # asked to go on: it trains to the end
    trainer.run(config, tmp_path / "stopped")
    more = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in more) == 6


def test_keep_best_exports_the_parameters_of_the_lowest_eval_loss(tmp_path):
    """A learning rate large enough to make the eval loss go up and down: the export equals the
    checkpoint of the step with the lowest eval loss, not the last step's parameters."""
    _, records = _run(tmp_path, "best", **{"eval.keep_best": True, "optim.lr": 0.05, "train.steps": 6})
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert 0 < best_step < 6, evals  # the case this test is for: neither the start nor the end
    exported = _adapter(tmp_path / "best")
    import orbax.checkpoint as ocp
    saved = ocp.PyTreeCheckpointer().restore(tmp_path / "best" / "checkpoints" / str(best_step) / "state")
    # The decoder blocks are stacked (one group, every layer): layer 0's A is the first slice.
    a = np.asarray(saved["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"]["value"])[0]
    np.testing.assert_array_equal(exported["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], a.T)


@pytest.mark.parametrize("overrides,fragment", [
    ({"eval.early_stopping_patience": 2, "data.eval": None}, "give data.eval"),
    ({"eval.keep_best": True, "data.eval": None}, "give data.eval"),
    ({"eval.early_stopping_patience": 2, "eval.every_steps": 0}, "set eval.every_steps"),
    ({"eval.early_stopping_patience": -1}, "must be >= 0"),
])
def test_early_stopping_without_evaluations_is_a_config_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(small_config(**overrides))


def test_a_step_saved_twice_keeps_the_first(tmp_path):
    """An interrupt right after a checkpoint saves the same step again, and a resumed run replays to a best
    evaluation it had already saved: neither may fail (orbax refuses to overwrite a step)."""
    import jax.numpy as jnp

    from jaxft.checkpoint import Checkpointer, fingerprint
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False, subdir="best")
    ckpt.save(3, dict(params=jnp.ones(3)), dict(fingerprint=fingerprint(jnp.ones(3))))
    ckpt.save(3, dict(params=jnp.ones(3)), dict(fingerprint=fingerprint(jnp.ones(3))))
    state, _ = ckpt.restore(3, dict(params=jnp.zeros(3)), fingerprint(jnp.ones(3)))
    ckpt.close()
    np.testing.assert_array_equal(state["params"], np.ones(3))



def test_keep_best_with_nothing_saved_says_so_and_exports_the_last(tmp_path, caplog):
    """Resumed with keep_best after a run without it, nothing is under best/: the last parameters are
    exported, and the log says why."""
    _run(tmp_path, "plain", **{"train.steps": 2})
    last = _adapter(tmp_path / "plain")
    caplog.set_level("WARNING", logger="jaxft")
    _run(tmp_path, "plain", **{"train.steps": 2, "eval.keep_best": True})
    assert "no evaluation was saved" in caplog.text
    assert all(np.array_equal(v, last[k]) for k, v in _adapter(tmp_path / "plain").items())
