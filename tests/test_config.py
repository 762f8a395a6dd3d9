import subprocess
import sys

import pytest

from jaxft.config import base_config, check_known_keys, validate
from jaxft.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _valid():
    c = base_config()
    c.model.path, c.data.train, c.train.steps = "/m", "/d.jsonl", 10
    return c


def test_valid_config_passes():
    validate(_valid())


def test_issue_keys_exist():
    c = base_config()
    for key in ("model.path", "data.train", "data.eval", "peft.method", "peft.rank", "peft.alpha",
                "peft.targets", "optim.name", "optim.lr", "optim.weight_decay", "optim.warmup_steps",
                "train.steps", "train.batch_size", "train.seq_len", "eval.every_steps",
                "checkpoint.every_steps"):
        section, name = key.split(".")
        assert name in c[section], key


@pytest.mark.parametrize("key,value,fragment", [
    ("peft.method", "lorax", "peft.method='lorax'"),
    ("optim.name", "adamww", "optim.name='adamww'"),
    ("optim.lr", -1.0, "optim.lr=-1.0 must be > 0"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("data.eval_fraction", 1.5, "data.eval_fraction"),
    ("model.dtype", "float8", "model.dtype"),
    ("model.dtype", "float16", "Use model.dtype=bfloat16"),
    ("checkpoint.every_seconds", -1.0, "checkpoint.every_seconds=-1.0 must be >= 0"),
    ("peft.quant_embeddings", True, "peft.quant_embeddings stores a QLoRA base's"),  # with method=lora
])
def test_bad_values_name_the_key(key, value, fragment):
    c = _valid()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        validate(c)


def test_steps_and_epochs_exclusive():
    c = _valid()
    c.train.epochs = 2
    with pytest.raises(ConfigError, match="exactly one of train.steps and train.epochs"):
        validate(c)


def test_missing_model_path_is_explained():
    c = _valid()
    c.model.path = None
    with pytest.raises(ConfigError, match="model.path is not set"):
        validate(c)


def test_unknown_key_names_nearest():
    c = _valid()
    c.unlock()
    c.optim.lrr = 1.0
    with pytest.raises(ConfigError, match="Unknown config key 'optim.lrr'. Did you mean 'optim.lr'"):
        check_known_keys(c)


def test_cli_unknown_key_fails_before_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs/quickstart.py"),
                          "--workdir", str(tmp_path / "run"), "--config.optim.lrr=1e-3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
