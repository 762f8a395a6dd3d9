"""`python -m jaxft.sweep` / `jaxft.sweep.run`: the space, the study's bookkeeping, and sweeps of real quickstart
runs with tiny budgets (grid, pruning, divergence, a kill and a rerun, processes sharing one study)."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from jaxft.config import from_overrides, overrides
from jaxft.errors import ConfigError
from jaxft.sweep import space as space_lib
from jaxft.sweep import study as study_lib
from jaxft.sweep.settings import sweep_config
from jaxft.sweep.trials import final_outcome
from tests.conftest import ROOT
from tests.test_trainer import small_config

pytestmark = pytest.mark.usefixtures("xla_cache")


def sweep_base(**overrides):
    """The quickstart LoRA run, 6 steps, evaluated every 2 on one batch, checkpointed every 2."""
    return small_config(**{"eval.every_steps": 2, "eval.max_batches": 1, "checkpoint.every_steps": 2,
                           "train.log_every_steps": 2, **overrides})


def _csv(workdir):
    with open(workdir / "results.csv") as f:
        return list(csv.DictReader(f))


def _load_recipe(path):
    spec = importlib.util.spec_from_file_location("best_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ----------------------------------------------------------------------------- the space


def test_space_parses_every_distribution_and_checks_against_the_schema():
    dims = space_lib.parse("optim.lr=loguniform(1e-5, 1e-2); peft.rank=choice(4, 8, 16)\n"
                           "peft.dropout=uniform(0, 0.2); optim.warmup_steps=int(0, 10, 5); "
                           "peft.method=choice(lora, 'qlora'); optim.weight_decay=quniform(0, 0.1, 0.05); "
                           "peft.adapter_size=logint(8, 64)")
    assert [d.kind for d in dims] == ["loguniform", "choice", "uniform", "int", "choice", "quniform", "logint"]
    assert dims[4].args == ("lora", "qlora")
    assert dims[3].grid() == [0, 5, 10] and dims[1].grid() == [4, 8, 16]
    assert dims[5].grid() == pytest.approx([0, 0.05, 0.1])
    space_lib.check(dims, small_config())
    assert space_lib.parse({"optim.lr": "loguniform(1e-5, 1e-2)"})[0].args == (1e-5, 1e-2)
    with pytest.raises(ConfigError, match="continuous"):
        dims[0].grid()
    config = space_lib.apply(small_config(), {"optim.lr": 1e-3, "peft.rank": 4})
    assert (config.optim.lr, config.peft.rank, small_config().peft.rank) == (1e-3, 4, 8)


@pytest.mark.parametrize("space, message", [
    ("optim.lr=loguniform(1e-5)", "loguniform takes 2 arguments, got 1"),
    ("optim.lr=logunifrom(1e-5, 1e-2)", "unknown distribution 'logunifrom'. Did you mean 'loguniform'"),
    ("optim.lr loguniform(1e-5, 1e-2)", "write it as key=distribution"),
    ("optim.lr=1e-3", "is not a distribution"),
    ("optim.lr=uniform(1e-2, 1e-5)", "low end must be below the high end"),
    ("optim.lr=loguniform(0, 1e-2)", "log scale needs a low end > 0"),
    ("peft.rank=int(4.5, 8)", "takes whole numbers"),
    ("peft.rank=choice(4, 4)", "lists a value twice"),
    ("optim.lr=choice(1e-3); optim.lr=choice(1e-4)", "names optim.lr twice"),
    ("", "search space is empty"),
])
def test_bad_space_strings_are_clear_errors(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        space_lib.parse(space)


@pytest.mark.parametrize("space, message", [
    ("optim.lrr=loguniform(1e-5, 1e-2)", "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'"),
    ("peft.rank=uniform(4, 32)", "peft.rank is a int; use int"),
    ("peft.method=choice(lora, loraa)", "at peft.method='loraa', peft.method='loraa' is not valid"),
    ("peft.dropout=uniform(0, 1.5)", r"at peft.dropout=1.5, peft.dropout=1.5 must be in \[0, 1\)"),
])
def test_space_keys_and_values_are_checked_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".") if "[" not in message
                       else message):
        space_lib.check(space_lib.parse(space), small_config())


def test_a_recipe_may_define_its_space(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from configs.quickstart import get_config\n\n\ndef sweep_space():\n"
                      "    return {'optim.lr': 'loguniform(1e-4, 1e-2)', 'peft.rank': 'choice(4, 8)'}\n")
    dims = space_lib.parse(space_lib.from_recipe(f"{recipe}:ignored"))
    assert [str(d) for d in dims] == ["optim.lr=loguniform(0.0001, 0.01)", "peft.rank=choice(4, 8)"]
    assert space_lib.from_recipe(str(ROOT / "configs" / "quickstart.py")) is None


def test_config_overrides_round_trip_as_a_recipe():
    config = sweep_base(**{"optim.lr": 1e-3, "peft.rank": 4})
    config.train.distill.temperature = 3.0
    again = from_overrides(overrides(config))
    assert again.to_dict() == config.to_dict() and again.is_locked
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        from_overrides({"optim.lrr": 1})


def test_metric_and_direction_are_checked():
    sweep = sweep_config()
    assert study_lib.objective(sweep, small_config()) == ("eval_loss", "minimize")
    sweep.metric = "eval_exact_match"
    assert study_lib.objective(sweep, small_config(**{"eval.metrics": "exact_match"})) == ("eval_exact_match",
                                                                                          "maximize")
    with pytest.raises(ConfigError, match="eval_exact_match' is not something the evaluation reports"):
        study_lib.objective(sweep, small_config())
    sweep.metric, sweep.mode = "loss", "auto"
    assert study_lib.objective(sweep, small_config()) == ("loss", "minimize")


# ----------------------------------------------------------------------------- bookkeeping, no training


def test_a_trial_whose_process_is_gone_is_failed_and_queued_again(tmp_path):
    sweep = sweep_config()
    study = study_lib.open_study(sweep, tmp_path, space_lib.parse("optim.lr=choice(1e-3, 1e-4)"), "minimize",
                                 "eval_loss")
    trial = study.ask()
    trial.suggest_categorical("optim.lr", [1e-3, 1e-4])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr(study_lib.OWNER, dict(study_lib.me(), pid=dead.pid))
    trial.set_user_attr(study_lib.HEARTBEAT, time.time())
    mine = study.ask()  # this process's own running trial is not taken over
    mine.set_user_attr(study_lib.OWNER, study_lib.me())
    mine.set_user_attr(study_lib.HEARTBEAT, time.time())
    assert study_lib.take_over_interrupted(study, sweep) == [trial.number]
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.FAIL and "has exited" in frozen.user_attrs[study_lib.REASON]
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs[study_lib.RESUMES]) for t in queued] == \
        [({"optim.lr": trial.params["optim.lr"]}, trial.number)]
    assert study_lib.take_over_interrupted(study, sweep) == []  # once
    # A study started for another space is not continued with this one.
    with pytest.raises(ConfigError, match="was started with space"):
        study_lib.open_study(sweep, tmp_path, space_lib.parse("optim.lr=choice(1e-3)"), "minimize", "eval_loss")


def test_journal_storage_for_shared_filesystems(tmp_path):
    sweep = sweep_config()
    sweep.storage = f"journal:{tmp_path / 'shared' / 'study.journal'}"
    study = study_lib.open_study(sweep, tmp_path, space_lib.parse("optim.lr=choice(1e-3)"), "minimize", "eval_loss")
    study.tell(study.ask(), 1.0)
    again = study_lib.open_study(sweep, tmp_path, space_lib.parse("optim.lr=choice(1e-3)"), "minimize", "eval_loss")
    assert [t.value for t in again.trials] == [1.0]
    with pytest.raises(ConfigError, match="is not a storage"):
        study_lib.make_storage("study.db")


def test_hyperband_prunes_by_training_step():
    """The hyperband pruner as the sweep builds it, on reported learning curves: trials far behind the others at
    the same steps are pruned before their last one, the best is not. (Hyperband also prunes middling trials:
    each is compared with the few of its bracket.)"""
    sweep = sweep_config()
    sweep.pruner = "hyperband"
    study = optuna.create_study(pruner=study_lib.make_pruner(sweep, total_steps=9),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    pruned = []
    for start in [1.0, 1.1, 0.9, 1.05, 0.95, 5.0, 5.1, 5.2]:
        trial = study.ask()
        for step in range(1, 10):
            trial.report(start / step, step)
            if trial.should_prune():
                pruned.append((start, step))
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, start / 9)
    assert any(start >= 5 and step < 9 for start, step in pruned) and 0.9 not in dict(pruned)


def test_final_value_is_the_last_or_the_exported_best(tmp_path):
    rows = [dict(step=0, eval_loss=4.0, eval_exact_match=0.0), dict(step=2, eval_loss=2.0, eval_exact_match=0.5),
            dict(step=4, eval_loss=3.0, eval_exact_match=0.7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_outcome(tmp_path, "eval_exact_match", None, 1.0).value == 0.7
    # keep_best exported step 2 (the lowest eval loss): the trial is judged there.
    assert final_outcome(tmp_path, "eval_exact_match", ("eval_loss", "min"), 1.0).value == 0.5
    failed = final_outcome(tmp_path, "eval_bleu", None, 1.0)
    assert failed.state == "failed" and "never logged 'eval_bleu'" in failed.reason


# ----------------------------------------------------------------------------- sweeps of real runs


def test_grid_runs_every_point_and_picks_the_lower_eval_loss(tmp_path, capsys):
    from jaxft import sweep
    workdir = tmp_path / "sweep"
    result = sweep.run(sweep_base(), "optim.lr=choice(3e-3, 1e-7, 1e9)", workdir, sampler="grid", pruner="none",
                       trials=10)
    rows = {float(r["optim.lr"]): r for r in _csv(workdir)}
    assert set(rows) == {3e-3, 1e-7, 1e9}  # the grid's 3 points, though 10 trials were allowed
    assert rows[3e-3]["state"] == rows[1e-7]["state"] == "complete"
    assert float(rows[3e-3]["eval_loss"]) < float(rows[1e-7]["eval_loss"])
    # lr 1e9 diverges: recorded as failed, with the reason, and the sweep went on.
    assert rows[1e9]["state"] == "failed" and "diverged" in rows[1e9]["note"]
    assert result.best_params == {"optim.lr": 3e-3} and result.best_trial == int(rows[3e-3]["trial"])
    best = _load_recipe(workdir / "best_config.py")
    assert best.to_dict() == space_lib.apply(sweep_base(), {"optim.lr": 3e-3}).to_dict()
    assert (workdir / "best" / "export" / "adapter" / "adapter_model.safetensors").exists()
    assert {p.name for p in (workdir / "plots").iterdir()} >= {"optimization_history.png", "slice.png",
                                                               "intermediate_values.png"}
    assert f"Best: trial {result.best_trial}" in capsys.readouterr().out


def test_median_pruning_stops_a_clearly_bad_trial_early(tmp_path):
    from jaxft import sweep
    workdir = tmp_path / "sweep"
    # Optuna's grid order is a seeded shuffle: with seed 0 the good rate runs first, and sets the median.
    sweep.run(sweep_base(), "optim.lr=choice(1e-7, 3e-3)", workdir, sampler="grid", pruner="median",
              prune_after_trials=1)
    rows = _csv(workdir)
    assert [(float(r["optim.lr"]), r["state"]) for r in rows] == [(3e-3, "complete"), (1e-7, "pruned")]
    assert int(rows[1]["steps"]) < 6 and "pruned at step" in rows[1]["note"]


def _sweep_command(workdir, *flags):
    """`python -m jaxft.sweep` on configs/quickstart.py with sweep_base()'s settings as --config flags."""
    from configs import quickstart
    recipe = overrides(quickstart.get_config())
    changed = {k: v for k, v in overrides(sweep_base()).items() if recipe.get(k) != v}
    defaults = sweep_base().copy_and_resolve_references()
    changed.update({k: _get(defaults, k) for k in recipe if k not in overrides(sweep_base())})  # as the schema
    return [sys.executable, "-m", "jaxft.sweep", "--config", str(ROOT / "configs" / "quickstart.py"),
            "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in changed.items()), *flags]


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_resumes_it_from_its_checkpoint(tmp_path, subprocess_xla_cache):
    from jaxft import sweep
    workdir = tmp_path / "sweep"
    space = "optim.lr=choice(3e-3, 1e-3, 1e-2)"
    command = _sweep_command(workdir, f"--sweep.space={space}", "--sweep.sampler=grid", "--sweep.trials=3",
                             "--sweep.pruner=none", "--config.train.steps=8")
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **subprocess_xla_cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = workdir / "trials" / "1" / "checkpoints" / "2"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), proc.stderr.read().decode()[-3000:]

    config = sweep_base(**{"train.steps": 8})
    result = sweep.run(config, space, workdir, sampler="grid", trials=3, pruner="none", isolation="subprocess")
    rows = _csv(workdir)
    interrupted = [r for r in rows if r["state"] == "failed"]
    assert len(interrupted) == 1 and interrupted[0]["note"].startswith("interrupted")
    complete = [r for r in rows if r["state"] == "complete"]
    assert sorted(float(r["optim.lr"]) for r in complete) == [1e-3, 3e-3, 1e-2]  # each point once
    resumed = next(r for r in complete if r["note"].startswith(f"resumes trial {interrupted[0]['trial']}"))
    assert resumed["optim.lr"] == interrupted[0]["optim.lr"]
    run_log = (workdir / "trials" / resumed["trial"] / "trial.log").read_text()
    assert "Resumed from" in run_log and not (workdir / "trials" / interrupted[0]["trial"]).exists()
    assert result.best_trial is not None


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path, subprocess_xla_cache):
    workdir = tmp_path / "sweep"
    command = _sweep_command(workdir, "--sweep.space=optim.lr=loguniform(1e-4, 1e-2)", "--sweep.sampler=random",
                             "--sweep.trials=4", "--sweep.pruner=none")
    env = dict(os.environ, **subprocess_xla_cache)
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-3000:] for _, e in outs]
    rows = _csv(workdir)
    # sweep.trials counts the trials of both; two that start at the same moment may run one each beyond it.
    assert 4 <= len(rows) <= 5 and {r["state"] for r in rows} == {"complete"}
    assert all((workdir / "trials" / r["trial"] / "export").is_dir() for r in rows)
    owners = {json.loads(line)["pid"] for line in _owners(workdir)}
    assert len(owners) == 2  # both did some of the work


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def _owners(workdir):
    study = optuna.load_study(study_name="jaxft", storage=f"sqlite:///{workdir / 'study.db'}")
    return [json.dumps(t.user_attrs[study_lib.OWNER]) for t in study.trials]


@pytest.mark.slow
def test_a_multi_process_sweep_trains_each_trial_on_the_whole_mesh(tmp_path, subprocess_xla_cache):
    """launch/local.sh: 2 processes x 2 CPU devices over gloo run one sweep; process 0 asks the study, both train."""
    from tests.test_sharding import fast_compile_env
    workdir, logs = tmp_path / "sweep", tmp_path / "logs"
    flags = _sweep_command(workdir, "--sweep.space=optim.lr=choice(3e-3, 1e-7)", "--sweep.sampler=grid",
                           "--sweep.pruner=none", "--config.train.steps=2")[3:]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "--devices-per-process", "2",
                           "--module", "jaxft.sweep", "--log-dir", str(logs), "--", *flags],
                          cwd=ROOT, env=fast_compile_env(PYTHON=sys.executable, **subprocess_xla_cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _csv(workdir)
    assert sorted((float(r["optim.lr"]), r["state"]) for r in rows) == [(1e-7, "complete"), (3e-3, "complete")]
    assert "Mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 devices in 2 process(es)" in \
        (logs / "process_1.log").read_text()


def test_cli_errors_name_the_problem(tmp_path):
    def run(*flags):
        proc = subprocess.run(_sweep_command(tmp_path / "s", *flags), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        return proc.returncode, proc.stderr
    code, err = run("--sweep.trails=3", "--sweep.space=optim.lr=choice(1e-3)")
    assert code == 2 and "Unknown sweep key 'trails'. Did you mean 'trials'?" in err
    code, err = run("--sweep.space=optim.lr=loguniform(1e-5 1e-2)")
    assert code == 2 and "is not a distribution" in err
    assert not (tmp_path / "s" / "trials").exists()
