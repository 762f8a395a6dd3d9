"""What a sweep leaves in its workdir: `results.csv` and a printed table of every trial, the best trial's config
as a ready-to-run recipe (`best_config.py`), `best` linked to its run directory, and plots (PNG)."""

import csv
import logging
import os
import pathlib
import warnings

from optuna.trial import TrialState

from jaxft.config import overrides
from jaxft.sweep.study import REASON, RESUMES

log = logging.getLogger("jaxft")

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "queued"}


def rows(study, metric: str, keys: list[str]) -> list[dict]:
    """One row per trial: trial, state, the metric, steps, seconds, each searched key, and why it did not
    complete."""
    out = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[t.last_step] if t.state == TrialState.PRUNED and t.last_step is not None else None)
        note = t.user_attrs.get(REASON, "")
        if t.user_attrs.get(RESUMES) is not None:
            note = f"resumes trial {t.user_attrs[RESUMES]}" + (f"; {note}" if note else "")
        out.append({"trial": t.number, "state": STATES.get(t.state, t.state.name.lower()), metric: value,
                    "steps": t.user_attrs.get("steps", ""), "seconds": t.user_attrs.get("seconds", ""),
                    **{k: t.params.get(k, "") for k in keys}, "note": note})
    return out


def write_csv(path, table: list[dict]) -> None:
    if not table:
        return
    tmp = pathlib.Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, path)


def format_table(table: list[dict], best: int | None) -> str:
    """The rows as aligned text, the best trial marked with '*'."""
    if not table:
        return "(no trials)"
    columns = [c for c in table[0] if c != "note"] + ["note"]
    cells = [[_cell(r[c]) for c in columns] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for r, row in zip(table, cells):
        mark = "* " if r["trial"] == best else "  "
        lines.append(mark + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_best_config(path, config, trial_number: int, metric: str, value: float, workdir) -> None:
    """The best trial's resolved config as a recipe: `python -m jaxft.train --config <path> --workdir ...`."""
    lines = [f'"""The best trial ({trial_number}) of the sweep in {workdir}: {metric} {value:.6g}.',
             "",
             f"    python -m jaxft.train --config {path} --workdir runs/best",
             '"""',
             "",
             "from jaxft.config import from_overrides",
             "",
             "",
             "def get_config(arg=None):",
             "    del arg",
             "    return from_overrides({"]
    lines += [f"        {key!r}: {value!r}," for key, value in sorted(overrides(config).items())]
    lines += ["    })", ""]
    pathlib.Path(path).write_text("\n".join(lines))


def link_best(workdir, trial_number: int) -> pathlib.Path:
    """`<workdir>/best` -> `trials/<number>` (its export is `best/export`)."""
    link = pathlib.Path(workdir) / "best"
    tmp = link.with_name("best.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(pathlib.Path("trials") / str(trial_number), target_is_directory=True)
    os.replace(tmp, link)
    return link


PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice")


def write_plots(study, directory) -> list[pathlib.Path]:
    """PNGs of Optuna's matplotlib plots that this study has enough trials for; the paths written."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    for name in PLOTS:
        if name in ("param_importances", "parallel_coordinate", "slice") and len(complete) < 2:
            continue  # nothing to compare yet
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = getattr(plots, f"plot_{name}")(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            figure.set_size_inches(9, 6)
            figure.tight_layout()
            path = directory / f"{name}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of a key that never varied
            log.info("Plot %s skipped: %s", name, e)
    return written
