"""Inspect the data a config would train on, without training.

    python -m jaxft.data --config configs/quickstart.py --show 3 [--config.data.train=...] [--split eval]

Prints the first `--show` examples as the model will see them, with the tokens
the loss is computed on between « and », then the data report (what was read,
kept, dropped and why, truncated, token lengths, the share of tokens in the loss).
Only the tokenizer is loaded, not the model.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from jaxft.cli import fail, parse_flags
from jaxft.config import check_known_keys
from jaxft.errors import JaxftError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_SHOW = flags.DEFINE_integer("show", 3, "How many examples to print.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which set to print examples from.")
flags.mark_flags_as_required(["config"])

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def render_example(tokenizer, ids, mask) -> str:
    """The example's text with each run of loss tokens wrapped in « »."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if mask[start] else text)
            start = i
    return "".join(parts)


def describe(data, tokenizer, split: str, count: int) -> str:
    """The first `count` examples of `split`, rendered, then the report as JSON."""
    from jaxft.data.sources import resolve

    examples = data.train.examples if split == "train" else data.eval
    lines = []
    if examples is None:
        lines.append("(no eval set: set data.eval or data.eval_fraction)")
        count = 0
    for i in range(min(count, len(examples) if examples is not None else 0)):
        ids, mask = examples.get(i)
        file_index, row = examples.origin[i]
        where = resolve(examples.report["source"]).where(int(file_index), int(row))
        lines.append(f"--- {split} example {i}  ({where}; {len(ids)} tokens, {int(mask.sum())} in the loss)")
        if examples.labels is not None:
            lines.append(f"label id {int(examples.labels[i])} = {data.label_names[int(examples.labels[i])]!r}")
        lines.append(render_example(tokenizer, ids, mask))
    lines.append("--- data report")
    lines.append(json.dumps(data.report, indent=2))
    return "\n".join(lines)


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    from jaxft import data as data_lib
    from jaxft.config import validate
    from jaxft.models import hf

    config = _CONFIG.value
    try:
        check_known_keys(config)
        validate(config)
        tokenizer = hf.load_tokenizer(config.model.path)
        data = data_lib.load(config, tokenizer)
    except JaxftError as e:
        fail(f"{type(e).__name__}: {e}")
    print(describe(data, tokenizer, _SPLIT.value, _SHOW.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
