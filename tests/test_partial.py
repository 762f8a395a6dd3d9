"""Partial fine-tuning (top blocks, embeddings, head, regexes) and gradual unfreezing."""

import numpy as np
import pytest
from flax import nnx

from jaxft import trainer
from jaxft.checkpoint import Checkpointer
from jaxft.config import base_config, validate
from jaxft.errors import ConfigError
from jaxft.models import stack
from jaxft.models.hf import load_pretrained
from jaxft.peft import prepare
from jaxft.peft.select import parameter_table
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config


def peft_cfg(**kw):
    c = base_config().peft
    c.method = "partial"
    for k, v in kw.items():
        c[k] = v
    return c


def trained_names(**kw):
    model = load_pretrained(str(QUICKSTART / "model"))
    method = prepare(model, peft_cfg(**kw), rngs=nnx.Rngs(0))
    names = list(stack.flat_layers(nnx.state(model, nnx.Param)))
    return {n for n in names if method.trainable.is_trainable(n)}, names, method, model


def test_top_blocks_embeddings_and_head_switches():
    trained, names, method, model = trained_names(train_top_blocks=1)
    assert trained == {n for n in names if n.startswith("model.layers.2.") or n == "model.norm.scale"}
    trained, _, _, _ = trained_names(train_embeddings=True)
    assert trained == {"model.embed_tokens.embedding"}  # the quickstart model ties its head to these
    rows = parameter_table(model, method.trainable)
    assert sum(r["params"] for r in rows if r["trainable"]) == sum(
        int(np.prod(v.shape)) for n, v in stack.flat_layers(nnx.state(model, nnx.Param)).items()
        if n.startswith("model.layers.2.") or n == "model.norm.scale")


def test_patterns_first_match_wins_and_bang_freezes():
    trained, names, _, _ = trained_names(patterns=r"!.*layernorm.*; model\.layers\.[01]\..*")
    expected = {n for n in names if n.startswith(("model.layers.0.", "model.layers.1.")) and "layernorm" not in n}
    assert trained == expected and expected


@pytest.mark.parametrize("kw,message", [
    ({}, "trains nothing"),
    ({"train_top_blocks": 9}, "has 3 blocks"),
    ({"patterns": "!.*"}, "names nothing to train"),
])
def test_partial_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        trained_names(**kw)


def test_unfreezing_needs_top_blocks():
    c = base_config()
    c.model.path, c.data.train, c.train.steps = "m", "t.jsonl", 1
    c.peft.method, c.peft.unfreeze_every_steps = "partial", 2
    with pytest.raises(ConfigError, match="set peft.train_top_blocks"):
        validate(c)


def _block_params(state_params, block):
    flat = {k: np.asarray(v) for k, v in stack.flat_layers(state_params).items()}
    return {k: v for k, v in flat.items() if k.startswith(f"model.layers.{block}.")}


def test_gradual_unfreezing_holds_lower_blocks_until_their_step(tmp_path):
    c = small_config(**{"peft.method": "partial", "peft.train_top_blocks": 3, "peft.unfreeze_every_steps": 2,
                        "train.steps": 5, "checkpoint.every_steps": 1, "checkpoint.keep": 10,
                        "eval.every_steps": 0, "optim.lr": 1e-3, "optim.weight_decay": 0.1,
                        "optim.warmup_steps": 0})
    trainer.run(c, tmp_path)
    base = load_pretrained(str(QUICKSTART / "model"))
    _, base_params, _ = nnx.split(base, nnx.Param, ...)
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=10, async_save=False)

    def changed(step, block):
        saved = ckpt.manager.restore(step)["state"]["params"]
        # Each block starts at its own step, so each is a stacked group of its own: group i is layer i.
        assert all(v.shape[0] == 1 for k, v in _flat(saved).items() if k.startswith("model.layers."))
        ours = {k: v[0] for k, v in _flat(saved).items() if k.startswith(f"model.layers.{block}.")}
        ref = _block_params(base_params, block)
        assert ours.keys() == ref.keys()
        return any(not np.array_equal(ours[k], ref[k]) for k in ours)

    # block 2 (top) trains from step 0, block 1 from step 2, block 0 from step 4
    assert changed(1, 2) and not changed(1, 1) and not changed(1, 0)
    assert not changed(2, 1) and changed(3, 1) and not changed(4, 0) and changed(5, 0)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name.removesuffix(".value")] = np.asarray(v)
    return out
