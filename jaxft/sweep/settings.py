"""The `sweep.*` keys of `python -m jaxft.sweep`, with their defaults, and their validation."""

import ml_collections
from ml_collections import config_dict

from jaxft.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "hyperband", "none")
ISOLATIONS = ("in_process", "subprocess")


def sweep_config() -> ml_collections.ConfigDict:
    """Every `--sweep.<key>` the sweep reads, with its default."""
    return ml_collections.ConfigDict(dict(
        # "key=distribution(...); ..." (jaxft/sweep/space.py); empty: the recipe's sweep_space()
        space="",
        trials=10,  # trials to finish (complete, pruned or failed), over every process sharing the study
        sampler="tpe",  # tpe (Bayesian), random, grid (every combination of choice/int values), cmaes
        pruner="median",  # stops a trial whose evaluations fall behind: median, hyperband, or none
        metric="eval_loss",  # any metric the run logs: eval_loss, eval_exact_match, eval_accuracy, loss, ...
        mode="auto",  # "min", "max", or "auto": min for losses and perplexity, max for scores
        # Where the study lives: default sqlite:///<workdir>/study.db. An SQLAlchemy URL
        # (postgresql://..., mysql://...) or journal:<file on a shared filesystem> lets many machines run
        # the same command against one study.
        storage=config_dict.placeholder(str),
        study_name="jaxft",
        isolation="in_process",  # trials one after another in this process, or each in a fresh subprocess
        seed=0,  # the sampler's; every trial trains with config.seed, so only the searched keys differ
        prune_after_trials=2,  # median: trials that finish before any is pruned
        prune_after_steps=0,  # no trial is pruned before this step
        max_failures=3,  # stop the sweep after this many failed trials in a row (a broken recipe, not a bad value)
        heartbeat_seconds=30.0,  # how often a running trial says it is alive
        # A running trial that has not said so for this long is taken as interrupted and resumed (at once when
        # its process on this machine is gone).
        stale_seconds=300.0,
    ))


def validate_sweep(sweep) -> None:
    """Check the sweep settings; ConfigError naming the bad one."""
    for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("isolation", ISOLATIONS),
                         ("mode", ("auto", "min", "max"))):
        if sweep[key] not in choices:
            raise ConfigError(f"sweep.{key}={sweep[key]!r} is not valid; choose one of "
                              f"{', '.join(map(repr, choices))}.")
    for key in ("trials", "max_failures"):
        if sweep[key] < 1:
            raise ConfigError(f"sweep.{key}={sweep[key]} must be >= 1.")
    for key in ("prune_after_trials", "prune_after_steps"):
        if sweep[key] < 0:
            raise ConfigError(f"sweep.{key}={sweep[key]} must be >= 0.")
    if not sweep.heartbeat_seconds > 0 or not sweep.stale_seconds > sweep.heartbeat_seconds:
        raise ConfigError(f"sweep.heartbeat_seconds={sweep.heartbeat_seconds} must be > 0 and below "
                          f"sweep.stale_seconds={sweep.stale_seconds}.")
    if not sweep.metric:
        raise ConfigError("sweep.metric is empty: name a metric the run logs, e.g. eval_loss.")
