r"""Command line: parse flags, then `trainer.run(config, workdir)`.

    python -m jaxft.train --config configs/quickstart.py --workdir runs/demo
    python -m jaxft.train --config configs/llama_lora.py --config.model.path=/models/x \
        --config.data.train=train.jsonl --config.optim.lr=2e-4 --workdir runs/x

The config is locked: `--config.optim.lrr=1` fails before any work, naming the
nearest valid key. User errors print one clear line and exit with status 2. SIGTERM or
SIGINT saves a checkpoint at the next step boundary and exits with status 75
(EX_TEMPFAIL: run the same command again to resume).
"""

from absl import app, flags
from ml_collections import config_flags

from jaxft.cli import parse_flags, run_command
from jaxft.config import check_known_keys

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: logs, checkpoints, exports. Reusing it resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv

    def train():
        from jaxft import trainer  # imported after flag parsing so --help stays fast
        check_known_keys(_CONFIG.value)
        trainer.run(_CONFIG.value, _WORKDIR.value, tune_host=True)

    run_command(train)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
