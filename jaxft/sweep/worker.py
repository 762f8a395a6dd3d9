"""One trial in its own process (`sweep.isolation=subprocess`): `python -m jaxft.sweep.worker <trial dir>`.

Reads `<trial dir>/request.json` (written by jaxft/sweep/trials.py: the trial's config as overrides of the
schema, the study's storage and name, the trial's id, the metric), trains with the trial reporting to the study,
and writes `<trial dir>/outcome.json` for the sweep, which records the outcome in the study.
"""

import json
import logging
import pathlib
import sys

import ml_collections
import optuna

from jaxft.config import from_overrides
from jaxft.sweep import study as study_lib
from jaxft.sweep.trials import run_in_process, write_outcome


def main(trial_dir: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("jaxft").setLevel(logging.INFO)
    request = json.loads((pathlib.Path(trial_dir) / "request.json").read_text())
    sweep = ml_collections.ConfigDict(request["sweep"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=request["study_name"], storage=study_lib.make_storage(request["storage"]),
                              pruner=study_lib.make_pruner(sweep, request.get("total_steps")))
    trial = optuna.trial.Trial(study, request["trial_id"])
    outcome = run_in_process(from_overrides(request["config"]), trial_dir, trial, request["metric"],
                             request.get("best_by"))
    write_outcome(trial_dir, outcome)


if __name__ == "__main__":
    main(sys.argv[1])
