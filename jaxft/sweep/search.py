"""The sweep loop: ask the study for a trial, train it, tell the study how it ended, until enough trials have.

On several processes (a TPU pod, a multi-GPU host) every process runs the same sweep: process 0 talks to the
study and shares each trial's parameters, and all of them train it together on the whole mesh.
"""

import dataclasses
import logging
import math
import os
import pathlib

import jax
import optuna
from optuna.trial import TrialState

from jaxft import sharding
from jaxft.config import best_metric, overrides, validate
from jaxft.errors import ConfigError, SweepStoppedError
from jaxft.sweep import results
from jaxft.sweep import space as space_lib
from jaxft.sweep import study as study_lib
from jaxft.sweep.settings import sweep_config, validate_sweep
from jaxft.sweep.trials import Outcome, run_in_process, run_in_subprocess

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class SweepResult:
    """What a sweep found. `best_*` are None when no trial completed."""

    workdir: pathlib.Path
    metric: str
    direction: str
    table: list[dict]  # one row per trial, as in results.csv
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict | None = None
    best_config: object = None  # the best trial's full config
    study: object = None


def run(config, space, workdir, sweep=None, **settings) -> SweepResult:
    """Search `space` (a string or dict, jaxft/sweep/space.py) around `config`, in `workdir`; continue the sweep
    there if one was started. `sweep`: the `sweep.*` settings (jaxft/sweep/settings.py), or pass them as keywords
    (`trials=6, sampler="grid"`).

    >>> import jaxft
    >>> config = jaxft.from_recipe("configs/quickstart.py", **{"train.steps": 2, "eval.every_steps": 0,
    ...                            "eval.metrics": "", "train.progress_bar": False})
    >>> result = jaxft.sweep.run(config, "optim.lr=choice(1e-3, 3e-3)", tmp / "sweep", sampler="grid",
    ...                          pruner="none")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
      trial  state  eval_loss ...
    Best: trial ...
    >>> result.best_params
    {'optim.lr': 0.003}
    """
    sweep = _settings(sweep, settings)
    validate(config)
    dimensions = space_lib.parse(space)
    space_lib.check(dimensions, config)
    metric, direction = study_lib.objective(sweep, config)
    limit = sweep.trials if sweep.sampler != "grid" else min(sweep.trials, math.prod(len(d.grid())
                                                                                        for d in dimensions))
    if sweep.pruner != "none" and not config.eval.every_steps and metric.startswith("eval_"):
        log.warning("sweep.pruner=%s judges trials by their evaluations during training, and eval.every_steps=0 "
                    "evaluates only at the end: nothing will be pruned.", sweep.pruner)
    sharding.initialize_distributed()
    if sweep.isolation == "subprocess" and jax.process_count() > 1:
        raise ConfigError("sweep.isolation=subprocess runs trials on one process; a multi-process sweep trains "
                          "each trial on the whole mesh in its processes: use sweep.isolation=in_process.")
    workdir = pathlib.Path(workdir)
    leader = jax.process_index() == 0
    study = None
    if leader:
        workdir.mkdir(parents=True, exist_ok=True)
        study = study_lib.open_study(sweep, workdir, dimensions, direction, metric, config.train.steps)
        log.info("Sweep %r in %s: %d trials (%d finished before), %s sampler, %s pruner, %s %s over %s",
                 sweep.study_name, study_lib.storage_url(sweep, workdir), limit, len(study_lib.finished(study)),
                 sweep.sampler, sweep.pruner, direction, metric, "; ".join(map(str, dimensions)))
    # With eval.keep_best a run exports its best evaluation (by eval.best_metric): the trial is judged there.
    keep_best = best_metric(config) if config.eval.keep_best else None
    failures = 0
    while (plan := sharding.from_process_zero(_next_trial(study, sweep, limit, dimensions) if leader else None)):
        number, params = plan["number"], plan["params"]
        trial_config = space_lib.apply(config, params)
        trial_dir = workdir / "trials" / str(number)
        if leader:
            _adopt_interrupted(workdir, plan.get("resumes"), trial_dir)
            log.info("Trial %d (%d of %d): %s", number, len(study_lib.finished(study)) + 1, limit, _fmt(params))
            trial = optuna.trial.Trial(study, plan["trial_id"])
            with study_lib.Heartbeat(trial, sweep.heartbeat_seconds):
                outcome = _run_trial(trial_config, workdir, trial_dir, trial, plan, sweep, metric, keep_best)
            _tell(study, trial, outcome)
            results.write_csv(workdir / "results.csv", results.rows(study, metric, [d.key for d in dimensions]))
            _log_outcome(study, number, outcome, metric)
        else:
            outcome = run_in_process(trial_config, trial_dir, None, metric, keep_best)
        state = sharding.from_process_zero(outcome.state if leader else None)
        failures = failures + 1 if state == "failed" and not outcome.reason.startswith("diverged") else 0
        if failures >= sweep.max_failures:
            raise SweepStoppedError(f"{failures} trials in a row failed, the last with: {outcome.reason}. The "
                                    f"finished trials are kept in {study_lib.storage_url(sweep, workdir)}; fix the "
                                    f"cause and run the same command again to continue.")
    return finish(study, config, dimensions, workdir, metric, direction) if leader else \
        SweepResult(workdir, metric, direction, [])


def _settings(sweep, settings: dict):
    sweep = (sweep or sweep_config()).copy_and_resolve_references()
    for key, value in settings.items():
        if key not in sweep:
            raise ConfigError(f"Unknown sweep setting {key!r}; known: {', '.join(sorted(sweep))}.")
        sweep[key] = value
    validate_sweep(sweep)
    return sweep


def _next_trial(study, sweep, limit: int, dimensions) -> dict | None:
    """The next trial to train, asked of the study (a queued one first), or None when enough have run."""
    study_lib.take_over_interrupted(study, sweep)
    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if len(study_lib.counted(study)) >= limit and not queued:
        return None
    trial = study.ask()
    params = {d.key: _plain(d.suggest(trial)) for d in dimensions}
    return dict(number=trial.number, trial_id=trial._trial_id, params=params,
                resumes=trial.user_attrs.get(study_lib.RESUMES))


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy scalars -> JSON


def _adopt_interrupted(workdir, number, trial_dir) -> None:
    """A resumed trial takes over its interrupted predecessor's run directory, checkpoints and all."""
    if number is None:
        return
    old = workdir / "trials" / str(number)
    if old.is_dir() and not trial_dir.exists():
        os.replace(old, trial_dir)
        log.info("Trial %s resumes interrupted trial %d from its run directory.", trial_dir.name, number)


def _run_trial(config, workdir, trial_dir, trial, plan, sweep, metric, keep_best) -> Outcome:
    if sweep.isolation == "in_process":
        return run_in_process(config, trial_dir, trial, metric, keep_best)
    request = dict(storage=study_lib.storage_url(sweep, workdir), study_name=sweep.study_name,
                   trial_id=plan["trial_id"], metric=metric, best_by=keep_best, sweep=sweep.to_dict(),
                   total_steps=config.train.steps, config=overrides(config))
    return run_in_subprocess(trial_dir, request)


def _tell(study, trial, outcome: Outcome) -> None:
    trial.set_user_attr("steps", outcome.steps)
    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    if outcome.reason:
        trial.set_user_attr(study_lib.REASON, outcome.reason)
    if outcome.state == "complete":
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL)


def _log_outcome(study, number: int, outcome: Outcome, metric: str) -> None:
    what = {"complete": f"{metric} {outcome.value:.4g}" if outcome.value is not None else "",
            "pruned": outcome.reason, "failed": outcome.reason}[outcome.state]
    try:
        best = f"; best so far: trial {study.best_trial.number} ({study.best_value:.4g})"
    except ValueError:  # no trial has completed yet
        best = ""
    log.info("Trial %d %s after %d steps (%.0f s): %s%s", number, outcome.state, outcome.steps, outcome.seconds,
             what, best)


def finish(study, config, dimensions, workdir, metric, direction) -> SweepResult:
    """Write results.csv, the printed table, the best trial's recipe and link, and the plots."""
    table = results.rows(study, metric, [d.key for d in dimensions])
    results.write_csv(workdir / "results.csv", table)
    result = SweepResult(pathlib.Path(workdir), metric, direction, table, study=study)
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        result.best_config = space_lib.apply(config, best.params)
        results.write_best_config(workdir / "best_config.py", result.best_config, best.number, metric, best.value,
                                  workdir)
        results.link_best(workdir, best.number)
    plots = results.write_plots(study, workdir / "plots")
    print(results.format_table(table, result.best_trial))
    if result.best_trial is None:
        print(f"No trial completed; results.csv in {workdir} says how each ended.")
    else:
        print(f"Best: trial {result.best_trial}, {metric} {result.best_value:.6g}: {_fmt(result.best_params)}\n"
              f"  its run: {workdir / 'best'} (export: {workdir / 'best' / 'export'})\n"
              f"  its config: python -m jaxft.train --config {workdir / 'best_config.py'} --workdir runs/best\n"
              f"  results.csv and {len(plots)} plots in {workdir}")
    return result


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

