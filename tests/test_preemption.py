"""Real jobs get stopped: SIGTERM/SIGINT save and stop at a step boundary, the same command resumes as if never
stopped, and one workdir takes one run at a time. (SIGKILL between checkpoints, then a resume that logs each step
once: tests/test_trainer.py, test_killed_run_resumes_to_identical_parameters.)"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft import trainer
from jaxft.errors import WorkdirInUseError
from jaxft.preemption import EXIT_PREEMPTED, Preempted
from tests.conftest import ROOT
from tests.test_trainer import small_config

# Most runs here train the same config: compiled once, loaded after (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("xla_cache")

STEPS = 8


def _config(**overrides):
    settings = {"train.steps": STEPS, "train.log_every_steps": 1, "eval.every_steps": 4,
                "checkpoint.every_steps": 100, "checkpoint.keep": 10}
    return small_config(**{**settings, **overrides})


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _learning_curve(workdir) -> dict:
    """(step, key) -> value of everything a run learns and evaluates (not its timings)."""
    keys = ("loss", "grad_norm", "lr", "eval_loss")
    return {(r["step"], k): r[k] for r in _rows(workdir) for k in keys if k in r}


def _signal_when(workdir, condition, sig=signal.SIGTERM):
    """Send `sig` to this process from a thread once `condition(workdir)` holds (polled every 10 ms)."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if condition(workdir):
                    os.kill(os.getpid(), sig)
                    return
            except (OSError, ValueError):  # a file still being written
                pass
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    trainer.run(_config(), workdir)
    return workdir


def _same_run(workdir, reference):
    assert _learning_curve(workdir) == pytest.approx(_learning_curve(reference), rel=1e-6)
    steps = [r["step"] for r in _rows(workdir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step logged once
    ours, theirs = (load_file(str(w / "export" / "adapter" / "adapter_model.safetensors"))
                    for w in (workdir, reference))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_sigterm_at_a_random_step_saves_there_and_the_rerun_finishes_as_if_never_stopped(uninterrupted, tmp_path):
    after = random.Random().randrange(1, STEPS - 2)
    _signal_when(tmp_path, lambda w: any(r.get("step", 0) >= after for r in _rows(w)))
    with pytest.raises(Preempted) as stopped:
        trainer.run(_config(), tmp_path)
    step = stopped.value.step
    assert after <= step < STEPS
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    assert not (tmp_path / "export").exists() and not (tmp_path / "run.lock").exists()
    trainer.run(_config(), tmp_path)
    _same_run(tmp_path, uninterrupted)


def test_ctrl_c_before_the_first_step_is_handled_and_the_rerun_resumes(uninterrupted, tmp_path):
    """SIGINT as soon as the run holds its workdir: it lands while the data or the model loads, the first
    evaluation runs or the first step compiles. Whichever, the run stops cleanly (at step 0 with nothing
    saved, or after step 1)."""
    _signal_when(tmp_path, lambda w: (w / "run.lock").exists(), signal.SIGINT)
    with pytest.raises(Preempted) as stopped:
        trainer.run(_config(), tmp_path)
    assert stopped.value.step in (0, 1)
    trainer.run(_config(), tmp_path)
    _same_run(tmp_path, uninterrupted)


def test_checkpoints_also_by_time(tmp_path):
    trainer.run(_config(**{"train.steps": 3, "checkpoint.every_seconds": 1e-6, "eval.every_steps": 0}), tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]


def test_a_second_run_in_a_workdir_in_use_stops_at_once(tmp_path):
    holder = dict(host=os.uname().nodename, pid=os.getpid(), started="2026-11-29T12:00:00+00:00")
    (tmp_path / "run.lock").write_text(json.dumps(holder))
    start = time.monotonic()
    with pytest.raises(WorkdirInUseError, match=rf"process {os.getpid()} on .*Wait for it.*delete .*run\.lock"):
        trainer.run(_config(), tmp_path)
    assert time.monotonic() - start < 5
    assert json.loads((tmp_path / "run.lock").read_text()) == holder  # the holder's lock is left alone


def _cli(workdir, *flags):
    return [sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs" / "quickstart.py"),
            "--workdir", str(workdir), *flags]


def _cli_flags(**overrides):
    return _cli_flags_of(_config(**overrides))


def test_the_cli_exits_with_the_preemption_status_and_resumes(tmp_path):
    flags = _cli_flags(**{"train.progress_bar": False, "train.steps": 200, "eval.every_steps": 0})
    from tests.test_sharding import fast_compile_env
    proc = subprocess.Popen(_cli(tmp_path, *flags), cwd=ROOT, env=fast_compile_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = pathlib.Path(tmp_path) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "the same command resumes" in err


def _worker_pid(workdir, process_id: int) -> int | None:
    """The pid of jaxft process `process_id` of the local.sh job writing `workdir`."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(workdir) not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"JAX_PROCESS_ID={process_id}".encode() in env and b"jaxft.train" in (proc / "cmdline").read_bytes():
            return int(proc.name)
    return None


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_rerun_resumes(two_process_lora,
                                                                                      subprocess_xla_cache, tmp_path):
    """2 processes x 4 devices over gloo: SIGTERM reaches process 1 only (its VM is preempted); both agree on the
    step, save it together and exit 75; the same command resumes; the result is the one-device run's, and bitwise
    the same run's straight through (tests/conftest.py's two_process_lora; the two share compiled programs)."""
    from tests.test_sharding import _losses, _relative_error, _trained, fast_compile_env
    config = two_process_lora.config
    command = ["bash", str(ROOT / "launch" / "local.sh"), "2", "--devices-per-process", "4", "--log-dir",
               str(tmp_path / "logs"), "--", *_cli(tmp_path / "run", *_cli_flags_of(config))[3:]]
    env = fast_compile_env(PYTHON=sys.executable, **subprocess_xla_cache)  # as two_process_lora's straight run
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = tmp_path / "run" / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= 3 for r in _rows(tmp_path / "run")):
            break
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.02)
    os.kill(_worker_pid(tmp_path / "run", 1), signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == EXIT_PREEMPTED, err[-3000:]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 8
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["step"] for r in _rows(tmp_path / "run") if "loss" in r] == list(range(1, 9))
    reference = two_process_lora.one_device
    assert _relative_error(_losses(tmp_path / "run"), _losses(reference)) <= 1e-5
    ours, theirs = _trained(tmp_path / "run", "lora"), _trained(reference, "lora")
    assert max(_relative_error(ours[k], theirs[k]) for k in theirs) <= 1e-5
    # Stopped at step saved[0] and resumed, it trained what it trains straight through, to the bit.
    straight = two_process_lora.straight
    curve = lambda w: {(r["step"], k): r[k] for r in _rows(w) for k in ("loss", "eval_loss") if k in r}  # noqa: E731
    assert curve(tmp_path / "run") == curve(straight)
    again = _trained(straight, "lora")
    assert ours.keys() == again.keys() and all(np.array_equal(ours[k], again[k]) for k in ours)


def _cli_flags_of(config):
    from tests.test_sharding import _cli_flags
    return _cli_flags(config)
