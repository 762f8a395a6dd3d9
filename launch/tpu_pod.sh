#!/usr/bin/env bash
# Runs jaxft on a Cloud TPU VM pod slice (several hosts). Every host runs the same training command
# at the same time; jax.distributed.initialize() finds the other hosts from the TPU metadata.
#
#   launch/tpu_pod.sh create --name N --zone Z --accelerator-type TYPE --version RUNTIME [--spot]
#   launch/tpu_pod.sh setup  --name N --zone Z    copy this checkout to every host, install it with jax[tpu]
#   launch/tpu_pod.sh run    --name N --zone Z -- TRAIN_ARGS...   python -m jaxft.train TRAIN_ARGS on every host
#   launch/tpu_pod.sh logs   --name N --zone Z [--log-dir DIR]   copy every host's log here (default logs/N)
#   launch/tpu_pod.sh stop   --name N --zone Z    end a run an interrupted ssh left behind (it holds the TPU)
#   launch/tpu_pod.sh delete --name N --zone Z
#
# All take --project P (default: gcloud's configured project) and --dry-run (print the commands, run nothing).
set -euo pipefail

usage() {
  echo "tpu_pod.sh: $1" >&2
  echo "usage: launch/tpu_pod.sh create|setup|run|logs|stop|delete --name NAME --zone ZONE [--project P] [--dry-run] ..." >&2
  echo "       (create also needs --accelerator-type and --version; run takes the training arguments after --)" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=dry_run.sh
. "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"

[[ $# -ge 1 ]] || usage "missing subcommand"
cmd=$1
shift
[[ $cmd =~ ^(create|setup|run|logs|stop|delete)$ ]] || usage "unknown subcommand '$cmd'"
name="" zone="" project="" accelerator="" version="" spot=0 dry_run=0 log_dir=""
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --) shift; train_args=("$@"); break ;;
    --dry-run) dry_run=1; shift ;;
    --spot) spot=1; shift ;;
    --name | --zone | --project | --accelerator-type | --version | --log-dir)
      [[ $# -ge 2 ]] || usage "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator=$2 ;;
        --version) version=$2 ;;
        --log-dir) log_dir=$2 ;;
      esac
      shift 2 ;;
    *) usage "unknown option '$1' (training arguments go after --)" ;;
  esac
done
[[ -n $name ]] || usage "--name is required"
[[ -n $zone ]] || usage "--zone is required"
if [[ $cmd == create ]]; then
  [[ -n $accelerator ]] || usage "create needs --accelerator-type (e.g. v5litepod-16)"
  [[ -n $version ]] || usage "create needs --version, the TPU VM runtime (e.g. v2-alpha-tpuv5-lite)"
fi
[[ $cmd == run || ${#train_args[@]} -eq 0 ]] || usage "only run takes arguments after --"
[[ $cmd != run || ${#train_args[@]} -gt 0 ]] || usage "run needs the training arguments after -- (--config ... --workdir ...)"

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z $project ]] || where+=(--project "$project")

case $cmd in
  create)
    extra=()
    ((spot == 0)) || extra=(--spot)
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version" "${extra[@]}"
    ;;
  setup)
    # Ship the working tree (tracked and untracked, minus what git ignores: no .venv, no runs/), so
    # uncommitted changes run too. uv provides a Python >= 3.11 where the TPU image has an older one.
    root=$(cd "$(dirname "$0")/.." && pwd)
    tarball="${TMPDIR:-/tmp}/jaxft-$name.tgz"
    # shellcheck disable=SC2016  # $1 and $2 are bash -c's own arguments
    run bash -c 'git -C "$1" ls-files -co --exclude-standard -z | tar -C "$1" --null -T - -czf "$2"' _ "$root" "$tarball"
    run "${tpu[@]}" scp "$tarball" "$name:jaxft.tgz" "${where[@]}" --worker=all
    # shellcheck disable=SC2016  # $HOME and $PATH expand on the TPU hosts, not here
    remote='set -e; mkdir -p ~/jaxft && tar -xzf ~/jaxft.tgz -C ~/jaxft && cd ~/jaxft; export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; [ -d .venv ] || uv venv --python 3.12 .venv; uv pip install --python .venv/bin/python -e . "jax[tpu]"'
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
    ;;
  run)
    # printf %q quotes each argument for the remote bash, so spaces and quotes arrive unchanged.
    # Each host keeps its own log; pipefail makes the host's exit status python's, not tee's.
    # JAXFT_DISTRIBUTED=1: jaxft calls jax.distributed.initialize(), which finds the hosts from the TPU metadata.
    # shellcheck disable=SC2016  # $(hostname) expands on each TPU host
    remote="cd ~/jaxft && mkdir -p logs && set -o pipefail && JAXFT_DISTRIBUTED=1 .venv/bin/python -m jaxft.train$(printf ' %q' "${train_args[@]}")"' 2>&1 | tee logs/worker-$(hostname).log'
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
    ;;
  logs)
    log_dir=${log_dir:-logs/$name}
    run mkdir -p "$log_dir"
    run "${tpu[@]}" scp "$name:jaxft/logs/worker-*.log" "$log_dir/" "${where[@]}" --worker=all
    ;;
  stop)
    # [j] keeps pkill from matching the remote shell that runs it, whose command line holds the pattern.
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "pkill -f '[j]axft[.]train' || true"
    ;;
  delete)
    run "${tpu[@]}" delete "$name" "${where[@]}"
    ;;
esac
