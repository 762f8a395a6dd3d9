"""Running one trial: the real trainer in `<workdir>/trials/<number>/`, a normal resumable run directory.

In this process (`sweep.isolation=in_process`, JAX's caches cleared after each trial) or in a fresh one
(`subprocess`: `python -m jaxft.sweep.worker <trial dir>`, which reports to the study itself). Each evaluation
is reported to the study, and the pruner may stop the trial there. The trial's value is read from the run's own
`metrics.jsonl` once it ends: the last value of the metric, or with `eval.keep_best` its value at the evaluation
the run judged best (what the run exports).
"""

import dataclasses
import gc
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from jaxft.errors import JaxftError, TrainingDivergedError

log = logging.getLogger("jaxft")

OUTCOME = "outcome.json"


class TrialPruned(Exception):
    """Raised from the trainer's metric hook when the pruner stops a trial."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} ({value:.4g})")
        self.step, self.value = step, value


@dataclasses.dataclass
class Outcome:
    """How a trial ended: state "complete", "pruned" or "failed", its value, the reason it failed."""

    state: str
    value: float | None = None
    steps: int = 0
    seconds: float = 0.0
    reason: str = ""


class Reporter:
    """The trainer's `on_metrics` hook: reports the metric at each step after 0 and asks the pruner.

    Step 0 is the evaluation of the model before training, the same for every trial of a method: it says nothing
    about the hyperparameters. On several processes process 0 reports and decides, and every process learns the
    decision, so all stop at the same step."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def __call__(self, step: int, metrics: dict):
        if step == 0 or self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        prune = False
        if self.trial is not None:  # process 0
            self.trial.report(value, step)
            prune = self.trial.should_prune()
        if _shared_flag(prune):
            raise TrialPruned(step, value)


def _shared_flag(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def run_in_process(config, trial_dir, trial, metric: str, best_by: tuple[str, str] | None) -> Outcome:
    """Train `config` in `trial_dir`, reporting `metric` to `trial` (None on processes other than 0); `best_by`
    as `final_outcome` takes it."""
    from jaxft import trainer
    start = time.time()
    try:
        trainer.run(config, trial_dir, on_metrics=Reporter(trial, metric))
    except TrialPruned as e:
        return Outcome("pruned", e.value, e.step, time.time() - start, str(e))
    except TrainingDivergedError as e:
        return Outcome("failed", None, _last_step(trial_dir), time.time() - start, f"diverged: {e}")
    except JaxftError as e:
        return Outcome("failed", None, _last_step(trial_dir), time.time() - start, f"{type(e).__name__}: {e}")
    finally:
        jax.clear_caches()  # the next trial's shapes and constants differ: its programs are new
        gc.collect()
    return final_outcome(trial_dir, metric, best_by, time.time() - start)


def final_outcome(trial_dir, metric: str, best_by: tuple[str, str] | None, seconds: float) -> Outcome:
    """A finished run's value: the last logged `metric`; or, when the run exported its best evaluation
    (`eval.keep_best`), `metric` at the step where `best_by` = (eval key, "min"/"max") was best (the first such)."""
    records = _records(trial_dir)
    values = {r["step"]: r[metric] for r in records if metric in r}
    steps = max((r["step"] for r in records), default=0)
    if not values:
        logged = sorted({k for r in records for k in r if k != "step"})
        return Outcome("failed", None, steps, seconds,
                       f"the run never logged {metric!r}; it logged {', '.join(logged) or 'nothing'}")
    value = values[max(values)]
    if best_by is not None:
        key, mode = best_by
        judged = [(r[key] if mode == "min" else -r[key], r["step"]) for r in records if key in r]
        best_step = min(judged)[1] if judged else None
        value = values.get(best_step, value)
    if not math.isfinite(value):
        return Outcome("failed", None, steps, seconds, f"{metric} is {value}")
    return Outcome("complete", float(value), steps, seconds)


def _records(trial_dir) -> list[dict]:
    path = pathlib.Path(trial_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_step(trial_dir) -> int:
    return max((r["step"] for r in _records(trial_dir)), default=0)


def run_in_subprocess(trial_dir, request: dict) -> Outcome:
    """Run the trial `request` describes (jaxft/sweep/worker.py) in a fresh Python process; its output goes to
    `<trial_dir>/trial.log`."""
    trial_dir = pathlib.Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "request.json").write_text(json.dumps(request, indent=2) + "\n")
    (trial_dir / OUTCOME).unlink(missing_ok=True)
    start = time.time()
    with open(trial_dir / "trial.log", "ab") as out:
        code = subprocess.call([sys.executable, "-m", "jaxft.sweep.worker", str(trial_dir)], stdout=out,
                               stderr=subprocess.STDOUT, env=dict(os.environ))
    path = trial_dir / OUTCOME
    if code != 0 or not path.exists():
        return Outcome("failed", None, _last_step(trial_dir), time.time() - start,
                       f"its process exited with status {code}; see {trial_dir / 'trial.log'}")
    return Outcome(**json.loads(path.read_text()))


def write_outcome(trial_dir, outcome: Outcome) -> None:
    (pathlib.Path(trial_dir) / OUTCOME).write_text(json.dumps(dataclasses.asdict(outcome)) + "\n")
