"""The Optuna study a sweep keeps its trials in: storage, sampler, pruner, what is optimised, and the bookkeeping
that lets a killed sweep be run again (who runs which trial, and which trials were interrupted).

A trial is owned by the process that asked for it: it records its host and process id and refreshes a heartbeat
while it trains. A RUNNING trial whose owner is gone (its process on this host has exited, or its heartbeat is
older than `sweep.stale_seconds`) was interrupted: it is marked FAIL with the reason, and a new trial with the same
parameters is queued, which takes over the interrupted trial's workdir and resumes from its last checkpoint.
"""

import logging
import os
import pathlib
import socket
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

from jaxft import task_metrics
from jaxft.errors import ConfigError
from jaxft.sweep.space import Dimension

log = logging.getLogger("jaxft")

OWNER, HEARTBEAT, RESUMES, REASON = "jaxft_owner", "jaxft_heartbeat", "jaxft_resumes", "jaxft_reason"
INTERRUPTED = "interrupted"


def objective(sweep, config) -> tuple[str, str]:
    """(the metric a trial is judged by, "minimize" or "maximize"); ConfigError when the run cannot report it."""
    metric = sweep.metric
    name = metric[len("eval_"):] if metric.startswith("eval_") else metric
    if metric.startswith("eval_") and config.data.eval is None and not config.data.eval_fraction:
        raise ConfigError(f"sweep.metric={metric!r} is an evaluation metric: give data.eval or data.eval_fraction.")
    if metric.startswith("eval_"):
        known = ["loss", "perplexity", *task_metrics.score_keys(task_metrics.parse(config.eval.metrics))]
        if name not in known and not (name.startswith("f1_") and "f1" in config.eval.metrics):
            raise ConfigError(f"sweep.metric={metric!r} is not something the evaluation reports; with "
                              f"eval.metrics={config.eval.metrics!r} it reports "
                              f"{', '.join('eval_' + k for k in known)}; choose one, or add it to eval.metrics.")
    mode = sweep.mode if sweep.mode != "auto" else "max" if task_metrics.better_is_higher(name) else "min"
    return metric, "minimize" if mode == "min" else "maximize"


def storage_url(sweep, workdir) -> str:
    """`sweep.storage`, or the SQLite database in the workdir."""
    return sweep.storage or f"sqlite:///{pathlib.Path(workdir).resolve() / 'study.db'}"


def make_storage(url: str):
    """Optuna storage for a URL: `journal:<file>` (a journal file, for shared filesystems), or an SQLAlchemy URL."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = pathlib.Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"sweep.storage={url!r} is not a storage: give an SQLAlchemy URL (sqlite:///study.db, "
                          f"postgresql://user@host/db, mysql://...) or journal:<file>.")
    # SQLite: several processes write one file; wait for its lock rather than fail at once.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (ImportError, ModuleNotFoundError) as e:
            raise ConfigError(f"sweep.storage={url!r} needs a database driver that is not installed: {e}") from None
        except Exception as e:  # SQLAlchemy's errors for a bad URL or an unreachable server
            # Two processes creating a new database's tables at once: one wins, the other finds them made.
            if attempt == 4 or "UNIQUE constraint" not in str(e) and "already exists" not in str(e):
                raise ConfigError(f"sweep.storage={url!r} cannot be opened: {e}") from None
            time.sleep(0.5 + attempt)


def make_sampler(sweep, dimensions: list[Dimension]):
    """The sampler `sweep.sampler` names, seeded with `sweep.seed`."""
    if sweep.sampler == "grid":
        return _GridSampler({d.key: d.grid() for d in dimensions}, seed=sweep.seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    if sweep.sampler == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=sweep.seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=sweep.seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, which does not stop the study itself once every point has run (`Study.stop` works
    only inside `Study.optimize`): the sweep runs as many trials as the grid has points and stops."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(sweep, total_steps: int | None = None):
    """The pruner `sweep.pruner` names. Hyperband's resource is the training step."""
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_after_trials,
                                           n_warmup_steps=sweep.prune_after_steps)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, sweep.prune_after_steps),
                                              max_resource=total_steps or "auto")
    return optuna.pruners.NopPruner()


def open_study(sweep, workdir, dimensions, direction, metric, total_steps=None) -> optuna.Study:
    """Create the study, or load it to continue; a study made for another space or metric is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # jaxft logs each trial itself
    url = storage_url(sweep, workdir)
    study = optuna.create_study(storage=make_storage(url), study_name=sweep.study_name, direction=direction,
                                sampler=make_sampler(sweep, dimensions),
                                pruner=make_pruner(sweep, total_steps), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"The study {sweep.study_name!r} in {url} is to {study.direction.name.lower()} and this "
                          f"sweep to {direction}; use another --sweep.study_name or --workdir.")
    mine = dict(space=sorted(map(str, dimensions)), metric=metric)
    for key, value in mine.items():
        earlier = study.user_attrs.get(key)
        if earlier is None:
            study.set_user_attr(key, value)
        elif earlier != value:
            raise ConfigError(f"The study {sweep.study_name!r} in {url} was started with {key} {earlier}, this "
                              f"sweep has {value}. Rerun with the same --sweep.space and --sweep.metric to continue "
                              f"it, or start another with a new --workdir or --sweep.study_name.")
    return study


# ----------------------------------------------------------------------------- owners and interruptions


def me() -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid())


def is_interrupted(trial) -> bool:
    return trial.state == TrialState.FAIL and trial.user_attrs.get(REASON, "").startswith(INTERRUPTED)


def counted(study) -> list:
    """The trials that count toward `sweep.trials`: finished ones (not interrupted), and those running or queued."""
    return [t for t in study.get_trials(deepcopy=False) if not is_interrupted(t)]


def finished(study) -> list:
    return [t for t in counted(study) if t.state.is_finished()]


def take_over_interrupted(study, sweep) -> list[int]:
    """Mark each RUNNING trial whose owner is gone as interrupted, and queue its parameters again; the numbers of
    the trials taken over."""
    taken = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = _gone(trial, sweep.stale_seconds)
        if why is None:
            continue
        try:
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(REASON, f"{INTERRUPTED}: {why}")
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process took it over first
        study.enqueue_trial(trial.params, user_attrs={RESUMES: trial.number})
        log.warning("Trial %d was interrupted (%s); its parameters are queued again and resume from its checkpoint.",
                    trial.number, why)
        taken.append(trial.number)
    return taken


def _gone(trial, stale_seconds: float) -> str | None:
    owner, beat = trial.user_attrs.get(OWNER), trial.user_attrs.get(HEARTBEAT)
    if owner and owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid() \
            and not _alive(owner.get("pid")):
        return f"its process {owner.get('pid')} on this host has exited"
    since = time.time() - (beat or trial.datetime_start.timestamp())
    if since > stale_seconds:
        return f"no heartbeat for {since:.0f} s"
    return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Heartbeat:
    """Marks `trial` as this process's and refreshes its heartbeat every `seconds` while inside."""

    def __init__(self, trial, seconds: float):
        self.trial, self.seconds = trial, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="jaxft-sweep-heartbeat", daemon=True)

    def __enter__(self):
        self.trial.set_user_attr(OWNER, me())
        self.trial.set_user_attr(HEARTBEAT, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _beat(self):
        while not self._stop.wait(self.seconds):
            try:
                self.trial.set_user_attr(HEARTBEAT, time.time())
            except Exception as e:  # a storage hiccup must not kill the trial; the next beat tries again
                log.warning("Could not record the heartbeat of trial %d: %s", self.trial.number, e)
