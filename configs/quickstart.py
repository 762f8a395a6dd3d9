"""Quickstart: LoRA-tune the tiny Llama shipped in jaxft/assets/quickstart on its instruction data.

    python -m jaxft.train --config configs/quickstart.py --workdir runs/demo

Nothing is downloaded. The model is a toy (a small Llama pretrained by
scripts/make_quickstart.py on generated text); see jaxft/assets/quickstart/README.md.
Runs in about a minute on 2 CPU cores.
"""

import importlib.resources

from jaxft.config import base_config


def get_config(arg=None):
    del arg
    assets = importlib.resources.files("jaxft") / "assets" / "quickstart"
    c = base_config()
    c.model.path = str(assets / "model")
    c.data.train = str(assets / "train.jsonl")
    c.data.eval = str(assets / "eval.jsonl")

    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 16.0
    c.peft.targets = "all-linear"

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01

    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 64  # the longest row is 64 tokens with BOS and EOS
    c.train.log_every_steps = 10
    c.eval.every_steps = 100
    # Answer 64 eval questions at every evaluation (step 0 is the base model) and score them; the run ends by
    # showing three answers before and after.
    c.eval.metrics = "exact_match"
    c.eval.generate_rows = 64
    c.eval.max_new_tokens = 24
    c.checkpoint.every_steps = 100
    return c
