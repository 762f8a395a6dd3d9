"""Command line: parse flags, then `trainer.run(config, workdir)`.

    python -m jaxft.train --config configs/quickstart.py --workdir runs/demo
    python -m jaxft.train --config configs/llama_lora.py --config.model.path=/models/x \
        --config.data.train=train.jsonl --config.optim.lr=2e-4 --workdir runs/x

The config is locked: `--config.optim.lrr=1` fails before any work, naming the
nearest valid key. User errors print one clear line and exit with status 2. SIGTERM or
SIGINT saves a checkpoint at the next step boundary and exits with status 75
(EX_TEMPFAIL: run the same command again to resume).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxft.cli import fail, parse_flags
from jaxft.config import check_known_keys
from jaxft.errors import JaxftError
from jaxft.preemption import EXIT_PREEMPTED, Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: logs, checkpoints, exports. Reusing it resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("jaxft").setLevel(logging.INFO)
    from jaxft import trainer  # imported after flag parsing so --help stays fast

    try:
        check_known_keys(_CONFIG.value)
        trainer.run(_CONFIG.value, _WORKDIR.value, tune_host=True)
    except Preempted as e:  # not an error: the job is asked to stop, and resumes when started again
        print(f"jaxft: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except JaxftError as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
