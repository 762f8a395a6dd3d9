"""Partial fine-tuning: train some of the pretrained weights themselves, freeze the rest.

Chosen by switches (`peft.train_top_blocks`, `peft.train_embeddings`,
`peft.train_lm_head`) or by `peft.patterns`: `;`-separated regexes over
parameter paths, first match wins, a leading `!` freezes, and everything no
pattern names stays frozen. Both become one `TrainableFilter` (select.py), so
the run's table logs each pattern and what it matched.

Gradual unfreezing (ULMFiT, Howard & Ruder 2018): with
`peft.unfreeze_every_steps=K` only the top block trains at first and one more
block below it joins every K steps, until `train_top_blocks` blocks train.
The optimizer holds state for every block that will train, and
`optim.hold_until` zeroes the updates of a block before its turn, so it stays
bitwise unchanged until then.
"""

import re

from jaxft.errors import ConfigError
from jaxft.models.layout import DECODER, Layout
from jaxft.peft.select import TrainableFilter


def partial_filter(cfg, num_layers: int, layout: Layout = DECODER) -> TrainableFilter:
    """The filter `config.peft` describes for a model with `num_layers` blocks whose parts are named as
    `layout` says."""
    if cfg.patterns:
        return TrainableFilter(_pattern_rules(cfg.patterns) + ((r".*", False),))
    if not (cfg.train_top_blocks or cfg.train_embeddings or cfg.train_lm_head):
        raise ConfigError("peft.method=partial trains nothing: set peft.train_top_blocks, peft.train_embeddings, "
                          "peft.train_lm_head, or peft.patterns.")
    if cfg.train_top_blocks > num_layers:
        raise ConfigError(f"peft.train_top_blocks={cfg.train_top_blocks} but the model has {num_layers} blocks.")
    rules = []
    if cfg.train_top_blocks:
        rules.append((layout.blocks_pattern(range(num_layers - cfg.train_top_blocks, num_layers)), True))
        if layout.final_norm:  # the final norm sits on top of the top block
            rules.append((rf"{re.escape(layout.final_norm)}\..*", True))
    if cfg.train_embeddings:
        rules.extend((rf"{re.escape(e)}\..*", True) for e in layout.embeddings)
    if cfg.train_lm_head:
        rules.append((rf"{re.escape(layout.lm_head)}\..*", True))
    return TrainableFilter(tuple(rules) + ((r".*", False),))


def _pattern_rules(patterns: str) -> tuple[tuple[str, bool], ...]:
    rules = []
    for item in (p.strip() for p in patterns.split(";")):
        if item:
            rules.append((item[1:], False) if item.startswith("!") else (item, True))
    if not any(trainable for _, trainable in rules):
        raise ConfigError(f"peft.patterns={patterns!r} names nothing to train (a leading '!' freezes).")
    return tuple(rules)


def unfreeze_step(name: str, cfg, num_layers: int, layout: Layout = DECODER) -> int:
    """The step at which parameter `name` starts to train: 0, or later for lower blocks when unfreezing."""
    every = cfg.unfreeze_every_steps
    block = layout.block_of(name)
    if not every or block is None:
        return 0
    depth_from_top = num_layers - 1 - block[0]
    return depth_from_top * every


def unfreeze_plan(cfg, num_layers: int) -> list[tuple[int, int]]:
    """(step, block) pairs of the gradual-unfreezing schedule, top block first; empty when off."""
    if not cfg.unfreeze_every_steps or not cfg.train_top_blocks:
        return []
    top = range(num_layers - 1, num_layers - 1 - cfg.train_top_blocks, -1)
    return [((num_layers - 1 - block) * cfg.unfreeze_every_steps, block) for block in top]
