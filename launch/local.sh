#!/usr/bin/env bash
# Runs N jaxft processes on this machine as if each were one host of a pod: CPU devices, real
# jax.distributed coordination. Multi-host code paths (per-host data, checkpoints, process-0-only
# writes) can be tried and tested here without a cluster.
#
#   launch/local.sh N [--devices-per-process K] [--port P] [--log-dir DIR] [--module M] -- ARGS...
#
# Process i runs `${PYTHON:-python} -m M ARGS...` with JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=K, JAX_COORDINATOR_ADDRESS=127.0.0.1:P,
# JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i; its output goes to DIR/process_<i>.log (process 0's also
# to the terminal). If one process fails the others are stopped: they would otherwise wait for it
# in a collective until the coordination timeout (minutes).
set -euo pipefail

usage() {
  echo "local.sh: $1" >&2
  echo "usage: launch/local.sh N [--devices-per-process K] [--port P] [--log-dir DIR] [--module M] -- ARGS..." >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage "first argument must be the number of processes (>= 1)"
num=$1
shift
devices=4 port="" log_dir=logs/local module=jaxft.train
python=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case $1 in
    --) shift; break ;;
    --devices-per-process | --port | --log-dir | --module)
      [[ $# -ge 2 ]] || usage "$1 needs a value"
      case $1 in
        --devices-per-process) devices=$2 ;;
        --port) port=$2 ;;
        --log-dir) log_dir=$2 ;;
        --module) module=$2 ;;
      esac
      shift 2 ;;
    *) usage "unknown option '$1' (training arguments go after --)" ;;
  esac
done
[[ $devices =~ ^[1-9][0-9]*$ ]] || usage "--devices-per-process must be a positive integer"
if [[ -z $port ]]; then
  # Ask the OS for a free port; it could be taken again before process 0 binds it, which is unlikely.
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
# Ctrl-C or an error in this script must not leave processes behind holding the port.
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  log="$log_dir/process_$i.log"
  # Appending keeps any XLA_FLAGS the caller set; the device count comes last so it wins.
  env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num" "JAX_PROCESS_ID=$i")
  if ((i == 0)); then
    env "${env_vars[@]}" "$python" -m "$module" "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_vars[@]}" "$python" -m "$module" "$@" >"$log" 2>&1 &
  fi
  pids+=($!)
done
echo "local.sh: $num processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir/" >&2

# Poll instead of `wait -n -p` (bash >= 5.1) so this runs on older bash too; bash reaps exited
# children in the background, so `kill -0` fails once one has exited and `wait` returns its status.
left=$num
final_status=0
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    if [[ -z ${pids[i]} ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    status=0
    wait "${pids[i]}" || status=$?
    pids[i]=""
    left=$((left - 1))
    if ((status == 75)); then
      # Preempted (jaxft's EX_TEMPFAIL): every process agreed on the step and is saving it; a signal
      # now would cut the others' saves short, so let them finish.
      echo "local.sh: process $i stopped on a signal after saving a checkpoint; the same command resumes." >&2
      final_status=75
      continue
    fi
    if ((status != 0)); then
      stop_all
      echo "local.sh: process $i failed (exit status $status); the others were stopped." >&2
      echo "local.sh: last lines of $log_dir/process_$i.log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2
      exit "$status"
    fi
  done
  sleep 0.2
done
exit "$final_status"
