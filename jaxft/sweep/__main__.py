r"""Command line: `python -m jaxft.sweep`, a hyperparameter search over `python -m jaxft.train` runs.

    python -m jaxft.sweep --config configs/quickstart.py --workdir runs/sweep \
        --sweep.space "optim.lr=loguniform(1e-4,1e-2); peft.rank=choice(4,8,16)" --sweep.trials 6 \
        [--sweep.sampler tpe|random|grid|cmaes] [--sweep.pruner median|hyperband|none] \
        [--sweep.metric eval_loss] [--config.<key>=<value> ...]

Every trial is a normal run directory under <workdir>/trials/<n>. The study is kept in <workdir>/study.db (or
--sweep.storage): run the same command again after a crash or kill and the sweep continues, the interrupted
trial resuming from its checkpoint. Machines that run the same command against one --sweep.storage share the
work. At the end: results.csv, best_config.py, best/ (the best run) and plots/.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxft.cli import check_override_keys, parse_flags, run_command
from jaxft.config import check_known_keys
from jaxft.errors import ConfigError
from jaxft.sweep import space as space_lib
from jaxft.sweep.settings import sweep_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py.",
                                          lock_config=True)
check_override_keys(sys.argv, "sweep", set(sweep_config().keys()))
_SWEEP = config_flags.DEFINE_config_dict("sweep", sweep_config(), "The search: --sweep.space, --sweep.trials, ...",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: the study, each trial's run, results, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv

    def search():
        from jaxft import sweep  # imported after flag parsing so --help stays fast
        check_known_keys(_CONFIG.value)
        space = _SWEEP.value.space or space_lib.from_recipe(config_flags.get_config_filename(flags.FLAGS["config"]))
        if not space:
            raise ConfigError('No search space: give --sweep.space "optim.lr=loguniform(1e-5,1e-2); ..." or define '
                              'sweep_space() in the recipe.')
        sweep.run(_CONFIG.value, space, _WORKDIR.value, _SWEEP.value)

    run_command(search)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
