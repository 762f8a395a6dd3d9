"""Hyperparameter search over jaxft runs, on Optuna: `python -m jaxft.sweep` or `jaxft.sweep.run(...)`.

    space.py     the search space string -> checked dimensions
    settings.py  the sweep.* keys
    study.py     Optuna storage, sampler, pruner; trial owners, interrupted trials
    trials.py    one trial: the trainer in <workdir>/trials/<n>, reporting to the pruner
    search.py    the loop (and the multi-process version of it)
    results.py   results.csv, the table, best_config.py, plots
"""

from jaxft.sweep.search import SweepResult, run
from jaxft.sweep.settings import sweep_config

__all__ = ["SweepResult", "run", "sweep_config"]
