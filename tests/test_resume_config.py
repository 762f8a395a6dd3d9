"""A resume under a changed config: changes to what is trained are refused, naming each key with its old and new
value, unless resume.allow_changes lists it; changes to how the run is watched are accepted and logged; every
start's config is kept."""

import json
import logging

import pytest

from jaxft import resume, trainer
from jaxft.config import validate
from jaxft.errors import ConfigError
from tests.test_trainer import small_config


def _config(**overrides):
    return small_config(**{"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0, **overrides})


def test_a_changed_learning_rate_is_refused_then_accepted_when_allowed(tmp_path, caplog):
    trainer.run(_config(), tmp_path)
    changed = {"optim.lr": 1e-3, "train.steps": 6}
    with pytest.raises(ConfigError, match=r"checkpoint \(step 4\).*optim\.lr: 0\.003 -> 0\.001; train\.steps: 4 -> 6"
                                          r".*--config\.resume\.allow_changes=optim\.lr,train\.steps"):
        trainer.run(_config(**changed), tmp_path)
    assert not (tmp_path / "config.2.json").exists()  # refused before anything was written
    with caplog.at_level(logging.INFO, logger="jaxft"):
        trainer.run(_config(**changed, **{"resume.allow_changes": "optim.lr,train.steps",
                                          "train.log_every_steps": 1}), tmp_path)
    assert any("changed settings" in r.getMessage() and "train.log_every_steps: 2 -> 1" in r.getMessage()
               for r in caplog.records)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [2, 4, 5, 6]  # logged every 2 steps, then every step after the resume
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("config.json", "config.2.json"))
    assert first["optim"]["lr"] == 3e-3 and second["optim"]["lr"] == 1e-3


def test_how_the_run_is_watched_may_change():
    saved = resume.resolved(_config())
    resume.check(saved, 4, _config(**{"eval.every_steps": 1, "checkpoint.keep": 1, "mesh.fsdp": 1,
                                      "model.layer_loop": "scan", "train.progress_bar": True}))
    seeded = _config(**{"peft.rank": 4})
    seeded.seed = 1
    with pytest.raises(ConfigError, match=r"peft\.rank: 8 -> 4; seed: 0 -> 1"):
        resume.check(saved, 4, seeded)


def test_an_unknown_key_to_allow_is_named():
    with pytest.raises(ConfigError, match=r"resume\.allow_changes: Unknown config key 'optim\.lrr'.*'optim\.lr'"):
        validate(_config(**{"resume.allow_changes": "optim.lrr"}))
