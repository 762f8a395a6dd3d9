"""Inspect the data a config would train on, without training.

    python -m jaxft.data --config configs/quickstart.py --show 3 [--config.data.train=...] [--split eval]

Prints the first `--show` examples as the model will see them, with the tokens
the loss is computed on between « and », then the data report (what was read,
kept, dropped and why, truncated, token lengths, the share of tokens in the loss).
Only the tokenizer is loaded, not the model.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from jaxft.cli import fail, parse_flags
from jaxft.config import check_known_keys
from jaxft.data.preview import describe
from jaxft.errors import JaxftError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_SHOW = flags.DEFINE_integer("show", 3, "How many examples to print.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which set to print examples from.")
flags.mark_flags_as_required(["config"])

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
